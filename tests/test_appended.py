"""The content appended during one update, past what memory holds (trainer/data/appended.py)."""

from __future__ import annotations

import hashlib
import tracemalloc

import numpy as np
import pytest

from trainer.data.appended import Appended, DiskTable


def _digests(n: int, shared_every: int = 0) -> list[bytes]:
    out = [hashlib.sha256(str(i).encode()).digest() for i in range(n)]
    if shared_every:  # these share their first 4 bytes (a probe walks past each other's)
        out = [b"\x05\x06\x07\x08" + d[4:] if i % shared_every == 0 else d
               for i, d in enumerate(out)]
    return out


def test_past_held_entries_every_digest_is_found_on_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(Appended, "MERGE", 16)
    monkeypatch.setattr(Appended, "HELD", 100)
    digests = _digests(3000, shared_every=50)
    column = np.frombuffer(b"".join(digests), "S32")
    appended = Appended(len(digests), tmp_path)
    for i, d in enumerate(digests[:2500]):
        appended.add(d, i)
    assert appended.disk is not None and 100 <= appended.n < 200  # the rest went to disk
    assert not list(tmp_path.iterdir())  # its file is unnamed

    def digest_of(j: int) -> bytes:
        return column[j:j + 1].tobytes()

    assert [appended.get(d, digest_of) for d in digests[:2500]] == list(range(2500))
    assert all(appended.get(d, digest_of) is None for d in digests[2500:])


def test_a_disk_tables_probes_wrap_around_its_end(tmp_path):
    table = DiskTable(20, tmp_path)  # 64 slots
    last = table.slots - 1
    for place in range(12):  # one prefix that starts in the last slot: its entries wrap
        table.add(last, place)
    table.add(last - 1, 99)
    assert list(table.places(last)) == list(range(12))
    assert list(table.places(last - 1)) == [99] and list(table.places(7)) == []


def test_past_held_entries_memory_does_not_grow(tmp_path, monkeypatch):
    """With 1,000 entries held, the traced peak grows < 1 byte an entry from 10,000 to
    40,000 (held in memory: 8, and the dict of the latest)."""
    monkeypatch.setattr(Appended, "MERGE", 256)
    monkeypatch.setattr(Appended, "HELD", 1000)
    peaks = []
    for n in (10_000, 40_000):
        digests = _digests(n)
        tracemalloc.start()
        try:
            appended = Appended(n, tmp_path)
            for i, d in enumerate(digests):
                appended.add(d, i)
            assert appended.get(digests[-1], lambda j, ds=digests: ds[j]) == n - 1
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    per_entry = (peaks[1] - peaks[0]) / 30_000
    assert per_entry < 1, f"{per_entry:.2f} bytes an entry ({peaks})"


def test_a_full_disk_under_the_table_is_one_error_naming_the_cache_and_resumes(tmp_path,
                                                                                monkeypatch):
    """The table's write failing (a full disk) in a first ingest raises an OSError that
    names the cache folder (the table's file is unnamed); what was complete stays committed
    and the next run decodes only the rest, its rows right."""
    import errno
    import os
    from pathlib import Path

    from tests.test_data_cache import _ingest_texts
    from trainer.data import appended, ingest

    monkeypatch.setattr(ingest, "READ_ROWS", 10)
    monkeypatch.setattr(Appended, "MERGE", 4)
    monkeypatch.setattr(Appended, "HELD", 8)
    root = tmp_path / "texts"
    root.mkdir()
    for i in range(45):
        (root / f"{i:03d}.txt").write_bytes(f"{i:04d}".encode())
    real, calls = os.pwrite, [0]

    def filling(*args):
        calls[0] += 1
        if calls[0] == 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args)

    monkeypatch.setattr(appended.os, "pwrite", filling)
    with pytest.raises(OSError, match="No space left") as raised:
        _ingest_texts(tmp_path / "c", root)
    assert raised.value.filename == str(tmp_path / "c")
    monkeypatch.setattr(appended.os, "pwrite", real)
    paths, rows, report, _ = _ingest_texts(tmp_path / "c", root)
    assert 0 < report.decoded < 45 and report.new == report.decoded
    assert [bytes(r).decode() for r in rows] == [Path(p).read_text() for p in paths]
