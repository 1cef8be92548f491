"""A table's files decoded ahead of their writing (trainer/data/ahead.py): in order, at most
`width` files at a time, errors raised in the writer, nothing left waiting when a file is
abandoned or the update stops; and a table of many files, string labels among them,
ingested that way."""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from export.errors import InputError
from trainer.data.ahead import Ahead
from trainer.data.dataset import SourceOptions
from trainer.data.sources import load_source


def _batches(key: int, n: int, live: list, peak: list, lock: threading.Lock):
    with lock:
        live.append(key)
        peak[0] = max(peak[0], len(live))
    try:
        for b in range(n):
            time.sleep(0.002)
            yield (key, b)
    finally:
        with lock:
            live.remove(key)


def _joined(things, timeout: float = 10.0):
    """Iterate in a thread with a deadline: a hang fails the test instead of stalling it."""
    out, box = [], {}

    def run():
        try:
            for t in things:
                out.append(t)
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the writer hung"
    if "error" in box:
        raise box["error"]
    return out


def test_files_come_in_order_and_at_most_width_decode_at_once():
    ahead, live, peak, lock = Ahead(3, depth=2), [], [0], threading.Lock()
    files = [ahead(k, _batches(k, 5, live, peak, lock)) for k in range(12)]
    time.sleep(0.2)  # every producer has had time to run as far as it may
    assert peak[0] <= 3  # the writer has read nothing: the 3 oldest files only
    got = _joined(b for f in files for b in f)
    assert got == [(k, b) for k in range(12) for b in range(5)]
    assert peak[0] <= 3 and not ahead.open


def test_an_abandoned_file_does_not_hold_the_later_ones():
    """A file whose content the writer found elsewhere is closed unread: the window moves on."""
    ahead, live, peak, lock = Ahead(1, depth=1), [], [0], threading.Lock()
    files = [ahead(k, _batches(k, 3, live, peak, lock)) for k in range(4)]
    files[0].close()
    files[2].close()
    assert _joined(b for f in (files[1], files[3]) for b in f) == [
        (1, 0), (1, 1), (1, 2), (3, 0), (3, 1), (3, 2)]
    assert not ahead.open


def test_a_producers_error_is_raised_in_the_writer_and_close_stops_the_rest():
    def bad():
        yield 1
        raise InputError("t.csv: row 3, column 'a' is empty")

    ahead, live, peak, lock = Ahead(2), [], [0], threading.Lock()
    first, broken = ahead(0, _batches(0, 2, live, peak, lock)), ahead(1, bad())
    endless = ahead(2, _batches(2, 10**6, live, peak, lock))  # never read
    assert _joined(first) == [(0, 0), (0, 1)]
    with pytest.raises(InputError, match="row 3, column 'a' is empty"):
        _joined(broken)
    ahead.close()
    deadline = time.monotonic() + 5
    while live and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not live  # the producer of the file never read stopped
    del endless


def _parquet_folder(root, files: int, rows: int, duplicates: int = 0):
    root.mkdir()
    rng = np.random.default_rng(0)
    labels = np.array(["ant", "bee", "cat", "dog", "eel", "fox"])
    for i in range(files):
        # each file sees a different subset of the labels first: codes depend on the order
        # files are decoded in, class names and indices must not
        pick = labels[(i % 3):(i % 3) + 4]
        table = pa.table({"a": rng.normal(size=rows).astype("float64"),
                          "b": rng.integers(0, 9, rows),
                          "kind": rng.choice(pick, rows)})
        pq.write_table(table, root / f"part-{i:02d}.parquet")
    for d in range(duplicates):  # the same bytes as a file before them
        (root / f"zcopy-{d}.parquet").write_bytes((root / f"part-{d:02d}.parquet").read_bytes())
    return root


def test_a_many_file_table_decoded_ahead_is_the_table_read_whole(tmp_path, monkeypatch):
    """Files decoded on threads of their own, two at a time, duplicates among them: every
    row in file order with its own label, and a second cache gives the same dataset. The
    number at once: one a core, and what fits in the byte budget."""
    import pyarrow.dataset as pads

    from trainer.data import tabular

    monkeypatch.setattr(tabular, "usable_cores", lambda: 2)  # two files decoded at once
    root = _parquet_folder(tmp_path / "t", files=9, rows=3000, duplicates=3)
    opts = SourceOptions(target="kind", cache_dir=str(tmp_path / "c1"))
    ds = _joined([load_source("tabular", str(root), opts)], timeout=120)[0]
    whole = pads.dataset(sorted(root.iterdir()), format="parquet").to_table()
    names = sorted(set(whole.column("kind").to_pylist()))
    assert ds.class_names == names
    expected_x = np.stack([whole.column("a").to_numpy(), whole.column("b").to_numpy()], 1)
    x, y = ds.train.arrays()
    np.testing.assert_array_equal(x, expected_x.astype(np.float32))
    assert y.tolist() == [names.index(v) for v in whole.column("kind").to_pylist()]
    fragments = list(pads.dataset(sorted(root.iterdir()), format="parquet").get_fragments())
    assert tabular._ahead_width(fragments, 2) == 2
    monkeypatch.setattr(tabular, "AHEAD_BYTES", 1)
    assert tabular._ahead_width(fragments, 2) == 1
    again = load_source("tabular", str(root), SourceOptions(target="kind",
                                                             cache_dir=str(tmp_path / "c2")))
    assert again.fingerprint == ds.fingerprint and again.train.y.tolist() == ds.train.y.tolist()


def test_how_many_files_at_once_comes_from_the_first_files_row_groups(tmp_path, monkeypatch):
    """The files in flight fit the byte budget from the first file's largest row group
    (its Parquet footer), one a core (the writer mostly waits on them); a file without row
    groups, or whose footer is damaged by the time it is looked at (its reading names it),
    counts as a small one."""
    import pyarrow.dataset as ds

    from trainer.data import tabular

    def fragment(name: str, rows: int):
        path = tmp_path / name
        pq.write_table(pa.table({f"f{j}": np.arange(rows, dtype=np.float64) for j in range(8)}),
                       path, row_group_size=max(rows, 1))
        return next(iter(ds.dataset(path, format="parquet").get_fragments())), path

    monkeypatch.setattr(tabular, "usable_cores", lambda: 16)
    small, _ = fragment("small.parquet", 20_000)  # a row group of ~1.6 MB
    assert tabular._ahead_width(small, 8) == 16  # 256 MiB would hold 21: the cores decide
    big, _ = fragment("big.parquet", 200_000)  # one row group of ~15 MB
    assert tabular._ahead_width(big, 8) == 6  # 256 MiB / (2 x 15 MB + 9.4 MB of batches)
    empty, _ = fragment("empty.parquet", 0)
    damaged, path = fragment("damaged.parquet", 10)
    path.write_bytes(b"PAR1 not a footer")
    for tiny in (empty, damaged):
        assert tabular._ahead_width(tiny, 8) == 16
    monkeypatch.setattr(tabular, "usable_cores", lambda: 2)
    assert tabular._ahead_width(big, 8) == 2  # two cores, two files
    monkeypatch.setattr(tabular, "usable_cores", lambda: 1)
    assert tabular._ahead_width(big, 8) == 1
