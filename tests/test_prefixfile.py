"""The index's digests searched from disk (trainer/data/prefixfile.py)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from trainer.data import bucketsort, prefixfile
from trainer.data.prefixfile import PrefixFile


def _values(n: int, seed: int, shared: int = 0) -> np.ndarray:
    """n distinct S32 values; with `shared`, runs of that many share their first 4 bytes
    (so one prefix spans pages)."""
    raw = np.random.default_rng(seed).integers(0, 256, (n, 32), dtype=np.uint8)
    if shared:
        raw[:, :4] = raw[(np.arange(n) // shared) * shared, :4]
    return raw.view("S32").reshape(-1)


@pytest.mark.parametrize("n, shared, small", [(0, 0, False), (1, 0, False), (5000, 0, False),
                                              (5000, 0, True), (3000, 700, True)])
def test_every_value_is_found_at_its_place_and_no_other(tmp_path, monkeypatch, n, shared, small):
    if small:  # buckets through the scratch file, short pages: prefixes across pages
        monkeypatch.setattr(bucketsort, "SORT_ROWS", 100)
        monkeypatch.setattr(bucketsort, "READ_ROWS", 333)
        monkeypatch.setattr(prefixfile, "PAGE", 16)
    values = _values(n, 1, shared)
    found = PrefixFile(n, lambda a, b: values[a:b], tmp_path)
    whole = lambda j: values[j:j + 1].tobytes()
    assert [found.find(values[j:j + 1].tobytes(), whole) for j in range(n)] == list(range(n))
    for other in _values(50, 2):  # absent, and absent with a present value's first 4 bytes
        assert found.find(other.tobytes(), whole) == -1
        if n:
            twin = values[n // 2:n // 2 + 1].tobytes()[:4] + other.tobytes()[4:]
            assert found.find(twin, whole) == -1
    assert not list(tmp_path.iterdir())  # its files are unnamed


def test_it_holds_no_memory_per_value(tmp_path, monkeypatch):
    """Built and searched, a PrefixFile's traced peak grows < 1 byte a value from 20,000 to
    80,000 values (the sorted prefixes and places in memory: 8)."""
    monkeypatch.setattr(bucketsort, "SORT_ROWS", 1024)
    monkeypatch.setattr(bucketsort, "READ_ROWS", 4096)
    peaks = []
    for n in (20_000, 80_000):
        values = _values(n, 3)
        tracemalloc.start()
        try:
            found = PrefixFile(n, lambda a, b, v=values: v[a:b], tmp_path)
            assert found.find(values[7:8].tobytes(), lambda j, v=values: v[j:j + 1].tobytes()) == 7
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    per_value = (peaks[1] - peaks[0]) / 60_000
    assert per_value < 1, f"{per_value:.2f} bytes a value ({peaks})"
