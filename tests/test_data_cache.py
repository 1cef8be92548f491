"""The per-file decoded-row cache: retraining data pays only for what changed, survives a
killed ingest and a damaged cache, and tables are read as they are kept (folders, globs,
hive partitions). Counts come from the cache itself, not from the log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from export.errors import InputError
from tests.conftest import ROOT, assert_one_line_error, run_cli
from trainer.data.cache import RowCache
from trainer.data.dataset import SourceOptions
from trainer.data.records import StoredIndex
from trainer.data.sources import load_source


def _png(path: Path, value: int, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def _folder(root: Path, per_class: int = 20) -> Path:
    for c, cls in enumerate(("ant", "bee", "cow")):
        for i in range(per_class):
            _png(root / cls / f"{i:03d}.png", 1000 * c + i)
    return root


def _cache_rows(cache_dir: Path) -> int:
    """Rows the image cache holds (decoded so far), read from its files."""
    (folder,) = cache_dir.glob("image_folder-*")
    (x,) = folder.glob("x.*.bin")
    return x.stat().st_size // (3 * 8 * 8)


def _load(root: Path, cache: Path, **kw):
    return load_source("image_folder", str(root), SourceOptions(cache_dir=str(cache), **kw))


def test_adding_removing_and_changing_files_decodes_only_those(tmp_path, capsys):
    root, cache = _folder(tmp_path / "imgs"), tmp_path / "cache"
    first = _load(root, cache)
    assert _cache_rows(cache) == 60
    assert "60 images: 60 new, 0 changed, 0 removed; decoded 60" in capsys.readouterr().err
    assert first.train.rows is None  # the cache holds the files' rows in order: no map

    for i in range(3):
        _png(root / "bee" / f"new{i}.png", 5000 + i)  # 3 new
    (root / "ant" / "000.png").unlink()  # 1 removed
    _png(root / "cow" / "001.png", 7777)  # 1 changed
    (root / "ant" / "001.png").rename(root / "cow" / "moved.png")  # known content, new name
    second = _load(root, cache)
    assert _cache_rows(cache) == 64  # only the 3 new and the 1 changed file were decoded
    assert "62 images: 4 new, 1 changed, 2 removed; decoded 4" in capsys.readouterr().err
    assert second.fingerprint != first.fingerprint
    fresh = _load(root, tmp_path / "fresh")  # a fresh ingest of the same files agrees
    assert fresh.fingerprint == second.fingerprint
    np.testing.assert_array_equal(fresh.train.arrays()[0], second.train.arrays()[0])
    np.testing.assert_array_equal(fresh.train.y, second.train.y)
    assert second.train.y[list(second.train.rows).index(second.train.rows[-1])] == 2
    assert fresh.train.rows is None and second.train.rows is not None
    assert second.train.rows.dtype == np.int32  # 4 bytes a file below 2**31 rows


def _aged(root: Path) -> None:
    """Every file's mtime an hour back: its record is not racily clean (filestat.py)."""
    hour_ago = time.time_ns() - 3600 * 10**9
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, ns=(hour_ago, hour_ago))


def _rewritten_in_place(path: Path) -> None:
    """Another image of the same size (PNG ignores the tail), with the same mtime and inode:
    what a rewrite within one tick of the filesystem's timestamps leaves."""
    import io

    st, data = path.stat(), path.read_bytes()
    img = np.asarray(Image.open(path)).copy()
    img[0, 0] = 255 - img[0, 0]
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=9)
    new = buf.getvalue()
    assert len(new) <= len(data)
    with open(path, "r+b") as f:  # in place: the same inode
        f.write(new + b"\0" * (len(data) - len(new)))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_ino) == (st.st_size, st.st_ino)


def test_a_same_size_same_mtime_change_is_caught_by_verify_cache(tmp_path):
    root, cache = _folder(tmp_path / "imgs", per_class=4), tmp_path / "cache"
    _aged(root)
    before = _load(root, cache)
    _rewritten_in_place(root / "bee" / "002.png")
    assert _load(root, cache).fingerprint == before.fingerprint  # trusted by stat
    verified = _load(root, cache, verify_cache=True)
    assert verified.fingerprint != before.fingerprint and _cache_rows(cache) == 13
    assert verified.fingerprint == _load(root, tmp_path / "fresh").fingerprint


def test_a_file_rewritten_within_its_timestamps_tick_is_read_again(tmp_path, monkeypatch,
                                                                   capsys):
    """A record made within seconds of its file's mtime is racily clean (git's term): a
    rewrite in the same tick of the filesystem's timestamps keeps size, mtime and inode, so
    the next update reads such a file again, without --data.verify_cache, and only it; its
    content found cached is not decoded, and once its record is older it is trusted."""
    from trainer.data import filestat, ingest

    root, cache = _folder(tmp_path / "imgs", per_class=4), tmp_path / "cache"
    _aged(root)
    path = root / "bee" / "002.png"
    os.utime(path)  # written just now, as the ingest begins
    before = _load(root, cache)
    _rewritten_in_place(path)
    reads, real = [], ingest._read
    monkeypatch.setattr(ingest, "_read", lambda p, *a: (reads.append(str(p)), real(p, *a))[1])
    capsys.readouterr()
    after = _load(root, cache)
    assert reads == [str(path)]
    assert "0 new, 1 changed, 0 removed; decoded 1" in capsys.readouterr().err
    assert after.fingerprint != before.fingerprint
    assert after.fingerprint == _load(root, tmp_path / "fresh").fingerprint
    reads.clear()
    monkeypatch.setattr(filestat, "RACY_NS", 0)  # as if seconds had passed since
    again = _load(root, cache)
    assert reads == [str(path)] and again.fingerprint == after.fingerprint  # read once more,
    reads.clear()  # its record now made long after its mtime
    assert _load(root, cache).fingerprint == after.fingerprint and reads == []


def test_a_damaged_cache_is_repaired_not_trusted(tmp_path, capsys):
    root, cache = _folder(tmp_path / "imgs", per_class=4), tmp_path / "cache"
    good = _load(root, cache).train.arrays()[0]
    (x_bin,) = cache.glob("image_folder-*/x.*.bin")
    raw = bytearray(x_bin.read_bytes())
    raw[5] ^= 0xFF  # a byte edited by hand
    x_bin.write_bytes(raw)
    np.testing.assert_array_equal(_load(root, cache, verify_cache=True).train.arrays()[0], good)

    with open(x_bin, "r+b") as f:  # truncated: the last rows are gone
        f.truncate(x_bin.stat().st_size - 2 * 192 - 7)
    capsys.readouterr()
    again = _load(root, cache)
    assert "decoding 3 files again" in capsys.readouterr().err
    np.testing.assert_array_equal(again.train.arrays()[0], good)

    (index,) = cache.glob("image_folder-*/index.npz")
    index.write_bytes(b"not arrow")
    np.testing.assert_array_equal(_load(root, cache).train.arrays()[0], good)
    assert "index.npz: unreadable" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["a byte of a column", "cut short", "a header zeroed",
                                    "compressed",
                                    "a column of objects", "meta not an object",
                                    "meta without its generation"])
def test_an_index_edited_by_hand_is_rebuilt_not_trusted(tmp_path, capsys, damage):
    """The index's columns are read where they lie in the file (by pread, not np.load), so
    opening it checks what np.load would: each member's CRC-32, its extent, a plain dtype."""
    from trainer.data.records import StoredIndex

    root, cache = _folder(tmp_path / "imgs", per_class=4), tmp_path / "cache"
    good = _load(root, cache).train.arrays()[0]
    (index,) = cache.glob("image_folder-*/index.npz")
    if damage == "a byte of a column":
        at = StoredIndex(index).members["start"][0]
        raw = bytearray(index.read_bytes())
        raw[at] ^= 0x01  # a file's rows now start one row off
        index.write_bytes(raw)
    elif damage == "cut short":
        index.write_bytes(index.read_bytes()[:-40])
    elif damage == "a header zeroed":  # numpy's parser raised tokenize's TokenError
        raw = bytearray(index.read_bytes())
        at = raw.find(b"\x93NUMPY")
        raw[at + 10:at + 40] = bytes(30)
        index.write_bytes(raw)
    else:
        with np.load(index) as z:
            columns = {k: z[k] for k in z.files}
        meta = json.loads(columns["meta"].tobytes())
        if damage.startswith("meta"):
            meta = [meta] if damage == "meta not an object" else {**meta, "gen": None}
            columns["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
            np.savez(index, **columns)
        elif damage == "compressed":
            np.savez_compressed(index, **columns)
        else:
            columns["key"] = columns["key"].astype(object)
            np.savez(index, allow_pickle=True, **columns)
    capsys.readouterr()
    again = _load(root, cache)
    assert "index.npz: unreadable" in capsys.readouterr().err
    np.testing.assert_array_equal(again.train.arrays()[0], good)
    np.testing.assert_array_equal(_load(root, cache).train.arrays()[0], good)
    assert "unreadable" not in capsys.readouterr().err  # rebuilt: read as it was written


KILLED_INGEST = """
import os, sys
import trainer.data.cache as cache
import trainer.data.ingest as ingest
cache.COMMIT_BYTES = 192 * 50  # commit every 50 images
ingest.READ_ROWS = int(sys.argv[3])  # files completed (and spilled) together
append, count = cache.RowCache.append, [0]
def dying_append(*args):
    count[0] += 1
    if count[0] == 130:
        os._exit(9)  # as SIGKILL: no cleanup, no commit
    return append(*args)
cache.RowCache.append = dying_append
from trainer.data.dataset import SourceOptions
from trainer.data.sources import load_source
load_source("image_folder", sys.argv[1], SourceOptions(cache_dir=sys.argv[2]))
"""


@pytest.mark.parametrize("block", [1 << 16, 64])
def test_a_killed_ingest_resumes_from_its_last_commit(tmp_path, capsys, block):
    """Killed while decoding its 130th image, an ingest that commits every 50 keeps 100;
    with blocks of 64 files, the second commit writes the first block's records from the
    spill and 36 of the second block's."""
    root, cache = _folder(tmp_path / "imgs", per_class=60), tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", KILLED_INGEST, str(root), str(cache),
                           str(block)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    (folder,) = cache.glob("image_folder-*")
    with RowCache.open(folder, {"x": ((3, 8, 8), "u1")},
                       {"decoder": "3", "mode": "RGB", "size": [8, 8]}) as c:
        committed = len(c.index)
    assert committed == 100  # the two whole commits, nothing of the third
    resumed = _load(root, cache)
    err = capsys.readouterr().err
    assert f"decoded {180 - committed}" in err
    assert resumed.fingerprint == _load(root, tmp_path / "fresh").fingerprint


def test_a_file_that_disappears_is_named(tmp_path, monkeypatch):
    root, cache = _folder(tmp_path / "imgs", per_class=3), tmp_path / "cache"
    from trainer.data import ingest

    real = ingest._read

    def vanishing(path, *args):
        if str(path).endswith("bee/001.png"):
            os.unlink(path)
        return real(path, *args)

    monkeypatch.setattr(ingest, "_read", vanishing)
    with pytest.raises(InputError, match=r"bee/001.png: disappeared during ingest"):
        _load(root, cache)


def test_listing_and_stat_in_forked_workers_equal_one_process(tmp_path, monkeypatch, capsys):
    """Past FORK_FILES the class folders are listed, and every file stat'ed, in forked
    processes (the floor of an update that finds little changed): the same rows, order and
    fingerprint as one process, a start with nothing changed decodes nothing, and a file
    removed after the listing is named by the worker that stat'ed it, in one line."""
    from trainer.data import image_folder, ingest, scan

    root = _folder(tmp_path / "imgs", per_class=12)
    _png(root / "bee" / "deep" / "er" / "x.png", 77)  # a sub-folder: listed in a worker too
    alone = _load(root, tmp_path / "alone")
    forks = {"listing": 0, "stat": 0}

    def counted(what):
        def fork(workers):
            forks[what] += 1
            return scan.fork_pool(workers)
        return fork

    monkeypatch.setattr(scan, "FORK_FILES", 1)
    monkeypatch.setattr(scan, "usable_cores", lambda: 2)  # forks on a 1-core machine too
    monkeypatch.setattr(ingest, "STAT_BLOCK", 5)  # several pieces a worker
    monkeypatch.setattr(image_folder, "fork_pool", counted("listing"))
    monkeypatch.setattr(ingest, "fork_pool", counted("stat"))  # decoding 37 tiny files: no fork
    forked = _load(root, tmp_path / "forked")
    assert forks == {"listing": 1, "stat": 1}
    assert forked.fingerprint == alone.fingerprint and len(forked.train) == 37
    assert np.array_equal(forked.train.x[:], alone.train.x[:])
    assert np.array_equal(forked.train.y, alone.train.y)
    capsys.readouterr()
    assert _load(root, tmp_path / "forked").fingerprint == alone.fingerprint
    assert "37 images: 0 new, 0 changed, 0 removed; decoded 0" in capsys.readouterr().err

    real = image_folder._layout

    def then_removed(folder, spill=None):
        out = real(folder, spill)
        os.unlink(root / "cow" / "011.png")
        return out

    monkeypatch.setattr(image_folder, "_layout", then_removed)
    with pytest.raises(InputError, match=r"cow/011.png: disappeared during ingest$"):
        _load(root, tmp_path / "forked")
    assert forks == {"listing": 3, "stat": 3}


def test_a_class_folder_removed_after_the_listing_is_named_in_one_line(tmp_path, monkeypatch):
    """Files are stat'ed by name in their open folder: a folder gone between the listing and
    the stat falls back to the whole path, which names its first file, and the cache of the
    run before stays whole."""
    import shutil

    from trainer.data import image_folder

    root, cache = _folder(tmp_path / "imgs", per_class=3), tmp_path / "cache"
    before = _load(root, cache).fingerprint
    real = image_folder._layout

    def then_removed(folder, spill=None):
        out = real(folder, spill)
        shutil.move(root / "cow", tmp_path / "cow-elsewhere")
        return out

    monkeypatch.setattr(image_folder, "_layout", then_removed)
    with pytest.raises(InputError, match=r"cow/000.png: disappeared during ingest$"):
        _load(root, cache)
    monkeypatch.undo()
    shutil.move(tmp_path / "cow-elsewhere", root / "cow")
    assert _load(root, cache).fingerprint == before


def test_images_decoded_in_forked_workers_come_back_through_shared_memory(tmp_path,
                                                                           monkeypatch):
    """Once the decoding is forked, each image's rows come back in a slot of a shared slab
    (trainer/data/workers.py), not through the pool's pipe: the same cache files, byte for
    byte, as decoding in this process; and with slots as few as the files in flight allow
    (their reuse), still the same."""
    from trainer.data import ingest, workers

    root = _folder(tmp_path / "imgs", per_class=40)  # 120 files: enough to fork
    monkeypatch.setattr(workers, "FORK_BYTES", 1)
    monkeypatch.setattr(workers, "usable_cores", lambda: 2)
    taken = []
    real_take = workers.Slab.take
    monkeypatch.setattr(workers.Slab, "take", lambda self, rows: taken.append(rows.slot) or
                        real_take(self, rows))
    forked = _load(root, tmp_path / "forked")
    assert len(taken) == 120 and len(set(taken)) == 120  # each in its own slot
    monkeypatch.setattr(ingest, "BLOCK", 8)  # 16 files in flight at most: 32 slots, reused
    taken.clear()  # (the first 64 files are decoded before the pool forks)
    reused = _load(root, tmp_path / "reused")
    assert len(taken) > 32 and set(taken) == set(range(32))
    monkeypatch.setattr(workers, "SLAB_BYTES", 0)  # no slab: through the pipe, as before
    piped = _load(root, tmp_path / "piped")
    for a, b in ((forked, piped), (reused, piped)):
        assert a.fingerprint == b.fingerprint
        assert np.array_equal(a.train.x[:], b.train.x[:])
    (one,) = (tmp_path / "forked").glob("image_folder-*/x.*.bin")
    (two,) = (tmp_path / "piped").glob("image_folder-*/x.*.bin")
    assert one.read_bytes() == two.read_bytes()


def test_an_update_forks_as_many_decoders_as_its_files_need(tmp_path, monkeypatch):
    """A forked decoding pool has one worker per usable core, but at most one per
    WORKER_FILES files known to need decoding: a first ingest of 360 files on 8 cores forks
    5 (360 // 64), an update of 130 new files 2, and the cache is the same as one made
    by one process."""
    from trainer.data import workers

    root = _folder(tmp_path / "imgs", per_class=120)
    _aged(root)  # else the update reads the 360 again (racily clean: filestat.py)
    monkeypatch.setattr(workers, "FORK_BYTES", 1)
    monkeypatch.setattr(workers, "usable_cores", lambda: 8)
    forked, real = [], workers.fork_pool
    monkeypatch.setattr(workers, "fork_pool", lambda n: forked.append(n) or real(n))
    first = _load(root, tmp_path / "c")
    assert forked == [5]
    for i in range(130):
        _png(root / "cow" / f"new{i:03d}.png", 9000 + i)
    forked.clear()
    again = _load(root, tmp_path / "c")
    assert forked == [2] and len(again.train.y) == len(first.train.y) + 130
    monkeypatch.setattr(workers, "usable_cores", lambda: 1)  # no worker: one process
    alone = _load(root, tmp_path / "alone")
    assert alone.fingerprint == again.fingerprint


def test_workers_are_forked_for_enough_files_each(monkeypatch):
    """One worker per usable core, per piece of work and per FORK_FILES files; none where
    one process does as well."""
    from trainer.data import scan

    monkeypatch.setattr(scan, "usable_cores", lambda: 64)
    assert scan.worth_forking(1_010_000, 987) == 61
    assert scan.worth_forking(1_010_000, 9) == 9  # one per class folder left
    assert scan.worth_forking(20_000, 20) == 0  # 20,000 files: not worth a second process
    assert scan.worth_forking(40_000, 40) == 2
    monkeypatch.setattr(scan, "usable_cores", lambda: 1)
    assert scan.worth_forking(1_010_000, 987) == 0


def test_a_decoding_worker_that_dies_is_one_line_and_the_cache_stays_usable(tmp_path,
                                                                           monkeypatch):
    """A forked decoder killed mid-ingest (SIGKILL, as the kernel's out-of-memory killer
    does) is one line naming the folder, not concurrent.futures' BrokenProcessPool
    traceback; the next run completes with a fresh ingest's fingerprint."""
    import signal

    import export.imaging
    from trainer.data import workers

    root = _folder(tmp_path / "imgs", per_class=30)
    real = export.imaging.decode

    def dies_on_one(data, spec, path):
        if path.endswith("bee/005.png"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(data, spec, path)

    monkeypatch.setattr(workers, "FORK_BYTES", 0)  # 90 tiny files: decoded in forked workers
    monkeypatch.setattr(workers, "usable_cores", lambda: 2)
    monkeypatch.setattr(export.imaging, "decode", dies_on_one)
    with pytest.raises(InputError, match=r"imgs: a worker process of the ingest died "
                                         r"\(killed, or out of memory\)"):
        _load(root, tmp_path / "cache")
    monkeypatch.setattr(export.imaging, "decode", real)
    assert _load(root, tmp_path / "cache").fingerprint == _load(root, tmp_path / "fresh").fingerprint


def _dies(_: int) -> None:
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def test_a_listing_worker_that_dies_is_one_line():
    from trainer.data.scan import fork_pool, in_order

    pool = fork_pool(2)
    try:
        with pytest.raises(InputError, match=r"^/data: a worker process of the ingest died"):
            list(in_order(pool, _dies, [(i,) for i in range(4)], 3, "/data"))
    finally:
        pool.shutdown(cancel_futures=True)


# ---------------------------------------------------------------- tables as they are kept

def _table(seed: int, n: int = 40, extra: dict | None = None) -> pa.Table:
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=n), rng.normal(size=n)
    return pa.table({"a": a, "b": b, "target": np.where(a + b > 0, "up", "down"),
                     **(extra or {})})


def test_a_folder_of_parquet_files_is_one_table_and_updates_per_file(tmp_path, capsys):
    folder = tmp_path / "t"
    folder.mkdir()
    for i in range(4):
        pq.write_table(_table(i), folder / f"part-{i}.parquet")
    (folder / "_SUCCESS").write_text("")  # written by Spark; not data
    ds = load_source("tabular", str(folder), SourceOptions(cache_dir=str(tmp_path / "c")))
    assert len(ds.train) == 160 and ds.class_names == ["down", "up"]
    assert ds.input_spec.columns == ("a", "b")
    whole = pa.concat_tables([_table(i) for i in range(4)])
    np.testing.assert_array_equal(ds.train.arrays()[0][:, 0], whole["a"].to_numpy().astype("f4"))
    assert "4 files: 4 new" in capsys.readouterr().err

    assert ds.train.rows is None  # the cache's rows are the table's, in order

    pq.write_table(_table(9), folder / "part-1b.parquet")  # between part-1 and part-2
    grown = load_source("tabular", str(folder), SourceOptions(cache_dir=str(tmp_path / "c")))
    assert "5 files: 1 new, 0 changed, 0 removed; decoded 1" in capsys.readouterr().err
    assert len(grown.train) == 200 and grown.train.rows is not None  # appended last
    assert grown.train.rows.dtype == np.int32  # 4 bytes a row below 2**31 rows
    fresh = load_source("tabular", str(folder), SourceOptions(cache_dir=str(tmp_path / "c2")))
    assert fresh.fingerprint == grown.fingerprint != ds.fingerprint
    for got, want in zip(grown.train.arrays(), fresh.train.arrays()):
        np.testing.assert_array_equal(got, want)


def test_a_table_write_that_fails_behind_the_decode_keeps_the_files_committed(
        tmp_path, monkeypatch, capsys):
    """A table's batches are written on a thread while the next is decoded: a write that
    fails there (a full disk at the fourth file) is raised at the next commit, what was
    committed before it stays, and nothing is committed after it (the fourth file's record
    would point at rows never written): the next run decodes the other three files only,
    and finds no record past the rows the cache holds."""
    import errno

    from trainer.data import cache, rowfile

    folder = tmp_path / "t"
    folder.mkdir()
    for i in range(6):
        pq.write_table(_table(i), folder / f"part-{i}.parquet")
    monkeypatch.setattr(cache, "COMMIT_BYTES", 1)  # a commit after every file
    real, calls = rowfile._write_parts, [0]

    def filling(files):
        calls[0] += 1
        if calls[0] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(files)

    monkeypatch.setattr(rowfile, "_write_parts", filling)
    opts = SourceOptions(cache_dir=str(tmp_path / "c"))
    with pytest.raises(OSError, match="No space left"):
        load_source("tabular", str(folder), opts)
    monkeypatch.setattr(rowfile, "_write_parts", real)
    capsys.readouterr()
    ds = load_source("tabular", str(folder), opts)
    err = capsys.readouterr().err
    assert "6 files: 3 new, 0 changed, 0 removed; decoded 3" in err
    assert "the index needs more" not in err, err
    assert ds.fingerprint == load_source("tabular", str(folder), SourceOptions(
        cache_dir=str(tmp_path / "fresh"))).fingerprint
    whole = pa.concat_tables([_table(i) for i in range(6)])
    np.testing.assert_array_equal(ds.train.arrays()[0][:, 0], whole["a"].to_numpy().astype("f4"))


@pytest.mark.parametrize("bad", ["cut short", "empty"])
def test_a_damaged_parquet_file_among_good_ones_is_named_in_one_line(tmp_path, bad, capsys):
    """A folder whose later file is cut short or empty (the first file is read to find the
    schema; the others when each is decoded): one line naming it, exit 2, the good files'
    rows cached for the next run, nothing in the folder touched."""
    from tests.conftest import assert_one_line_error, run_cli

    folder = tmp_path / "t"
    folder.mkdir()
    for i in range(3):
        pq.write_table(_table(i), folder / f"part-{i}.parquet")
    good = {p.name: p.read_bytes() for p in folder.iterdir()}
    (folder / "part-9.parquet").write_bytes(good["part-1.parquet"][:300] if bad == "cut short"
                                            else b"")
    with pytest.raises(InputError, match=r"part-9.parquet: cannot read table"):
        load_source("tabular", str(folder), SourceOptions(cache_dir=str(tmp_path / "c")))
    proc = run_cli("data", "--config", str(ROOT / "configs" / "tabular.yaml"), "--data.root",
                   str(folder), "--data.cache_dir", str(tmp_path / "c"), "--out",
                   str(tmp_path / "out.npz"))
    assert proc.returncode == 2
    assert_one_line_error(proc, "part-9.parquet", "cannot read table")
    assert not (tmp_path / "out.npz").exists()
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name in good} == good
    (folder / "part-9.parquet").unlink()
    capsys.readouterr()
    load_source("tabular", str(folder), SourceOptions(cache_dir=str(tmp_path / "c")))
    assert "3 files: 0 new, 0 changed, 0 removed; decoded 0" in capsys.readouterr().err


def _feature_range(tables) -> tuple[float, float]:
    x = np.concatenate([t.select(["a", "b"]).to_pandas().to_numpy("f4") for t in tables])
    return float(x.min()), float(x.max())


def test_the_value_range_is_composed_from_each_files_and_a_warm_start_reads_no_row(
        tmp_path, monkeypatch):
    from trainer.data import dataset

    folder, opts = tmp_path / "t", SourceOptions(cache_dir=str(tmp_path / "c"))
    folder.mkdir()
    tables = {i: _table(i) for i in range(3)}
    tables[3] = _table(3, extra={"a": np.full(40, 50.0)})  # holds the maximum
    for i, t in tables.items():
        pq.write_table(t, folder / f"part-{i}.parquet")
    ds = load_source("tabular", str(folder), opts)
    assert ds.input_spec.value_range == _feature_range(tables.values())

    measured = []  # every pass over a split's rows (the range's, the NaN scan's) is chunks()
    monkeypatch.setattr(dataset.Split, "chunks", lambda *a, **k: measured.append(1) or iter(()))
    again = load_source("tabular", str(folder), opts)
    assert again.input_spec.value_range == ds.input_spec.value_range and not measured

    (folder / "part-3.parquet").unlink()  # the maximum leaves; nothing is decoded for it
    del tables[3]
    assert load_source("tabular", str(folder), opts).input_spec.value_range == \
        _feature_range(tables.values()) and not measured
    monkeypatch.undo()

    # A file whose content the cache already holds under another name is not decoded: its
    # range comes from its cached rows. An entry edited by hand is measured again.
    (folder / "copy.parquet").write_bytes((folder / "part-1.parquet").read_bytes())
    assert load_source("tabular", str(folder), opts).input_spec.value_range == \
        _feature_range(tables.values())
    (index,) = (tmp_path / "c").glob("tabular-*/index.npz")
    with np.load(index) as z:
        columns = {k: z[k] for k in z.files}
    meta = json.loads(columns["meta"].tobytes())
    ranges = meta["extra"]["ranges"]  # the right file stats, values that are not numbers
    ranges.update({"part-0.parquet": [*ranges["part-0.parquet"][:3], "x", None],
                   "part-1.parquet": "garbage", "part-2.parquet": [1, 2]})
    columns["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    with open(index, "wb") as f:
        np.savez(f, **columns)
    assert load_source("tabular", str(folder), opts).input_spec.value_range == \
        _feature_range(tables.values())


def test_a_hive_partitioned_folder_and_a_csv_glob(tmp_path):
    for region, code in (("eu", 1), ("us", 2)):
        part = tmp_path / "hive" / f"zone={code}"
        part.mkdir(parents=True)
        pq.write_table(_table(code), part / "data.parquet")
    ds = load_source("tabular", str(tmp_path / "hive"), SourceOptions())
    assert ds.input_spec.columns == ("a", "b", "zone")  # the partition key is a column
    assert sorted(np.unique(ds.train.arrays()[0][:, 2]).tolist()) == [1.0, 2.0]

    for i in range(3):
        _table(i).to_pandas().to_csv(tmp_path / f"day{i}.csv", index=False)
    ds = load_source("tabular", str(tmp_path / "day*.csv"), SourceOptions())
    assert len(ds.train) == 120 and ds.class_names == ["down", "up"]


def test_the_same_bytes_under_two_partitions_are_two_files_rows(tmp_path):
    """A partition key is a column of the rows a file gives: the cache keyed files by their
    bytes alone, so a file copied into another partition shared the first one's rows (its
    key column held the other partition's value) and a file moved to another partition kept
    its old key, in an update and in a fresh ingest alike. A file's digest now holds the
    partition values its path gives it; a key left out of the rows changes nothing."""
    hive, opts = tmp_path / "hive", SourceOptions(cache_dir=str(tmp_path / "c"))
    for zone in (1, 2):
        (hive / f"zone={zone}").mkdir(parents=True)
    pq.write_table(_table(1), hive / "zone=1" / "a.parquet")
    (hive / "zone=2" / "a.parquet").write_bytes((hive / "zone=1" / "a.parquet").read_bytes())

    def zones(ds) -> list[float]:
        return sorted(set(ds.train.arrays()[0][:, 2].tolist()))

    first = load_source("tabular", str(hive), opts)
    assert zones(first) == [1.0, 2.0] and len(first.train) == 80
    (hive / "zone=3").mkdir()
    (hive / "zone=2" / "a.parquet").rename(hive / "zone=3" / "a.parquet")
    moved = load_source("tabular", str(hive), opts)
    assert zones(moved) == [1.0, 3.0]
    fresh = load_source("tabular", str(hive), SourceOptions(cache_dir=str(tmp_path / "f")))
    assert moved.fingerprint == fresh.fingerprint != first.fingerprint
    np.testing.assert_array_equal(moved.train.arrays()[0], fresh.train.arrays()[0])
    # left out of the rows, the key does not make the copies two contents
    left_out = load_source("tabular", str(hive), SourceOptions(
        cache_dir=str(tmp_path / "l"), exclude_columns=("zone",)))
    (x,) = (tmp_path / "l").glob("tabular-*/x.*.bin")
    assert left_out.train.arrays()[0].shape == (80, 2) and x.stat().st_size == 40 * 2 * 4
    # the key as the target: the same bytes under label=up and label=down were one class
    labels = tmp_path / "labels"
    for label in ("up", "down"):
        (labels / f"label={label}").mkdir(parents=True)
        pq.write_table(_table(1).drop(["target"]), labels / f"label={label}" / "a.parquet")
    ds = load_source("tabular", str(labels), SourceOptions(cache_dir=str(tmp_path / "c"),
                                                           target="label"))
    assert ds.class_names == ["down", "up"] and np.bincount(ds.train.y).tolist() == [40, 40]
    # pyarrow's partitioning of a folder without keys names every column: no keys here, so
    # such a folder's cache (reader "1", digests of bytes alone) is the one it was
    from export.tables import table_files
    from export.tableschema import partition_keys, table_dataset

    plain = tmp_path / "plain"
    plain.mkdir()
    pq.write_table(_table(3), plain / "a.parquet")
    assert partition_keys(table_dataset(*table_files(str(plain)))) == ()
    assert partition_keys(table_dataset(*table_files(str(hive)))) == ("zone",)
    load_source("tabular", str(plain), SourceOptions(cache_dir=str(tmp_path / "p")))
    (index,) = (tmp_path / "p").glob("tabular-*/index.npz")
    with np.load(index) as z:
        assert json.loads(z["meta"].tobytes())["settings"]["reader"] == "1"


@pytest.mark.parametrize("seed", range(3))
def test_seeded_rounds_over_a_hive_folder_agree_with_a_fresh_ingest(tmp_path, monkeypatch,
                                                                    seed):
    """Rounds of table files added, removed, rewritten, moved and copied between partitions
    (whose key is a feature), drawn from a seed, with pieces and blocks of a few files: each
    update's rows, labels and fingerprint are a fresh ingest's (this found the rows a copy
    under another partition shared)."""
    import random

    from trainer.data import ingest

    rng = random.Random(seed)
    monkeypatch.setattr(ingest, "STAT_BLOCK", rng.choice([1, 3]))
    monkeypatch.setattr(ingest, "READ_ROWS", rng.choice([2, 4]))
    hive = tmp_path / "hive"

    def place() -> Path:
        return hive / f"zone={rng.randrange(3)}" / f"part-{rng.randrange(20):02d}.parquet"

    def write(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(_table(rng.randrange(6), n=rng.randrange(1, 20)), path)

    for _ in range(rng.randrange(3, 8)):
        write(place())
    load_source("tabular", str(hive), SourceOptions(cache_dir=str(tmp_path / "c")))
    for r in range(5):
        for _ in range(rng.randrange(1, 5)):
            files, op, to = sorted(hive.rglob("*.parquet")), rng.randrange(5), place()
            if op == 0 or (op == 1 and len(files) > 1):
                write(to) if op == 0 else rng.choice(files).unlink()
            elif op == 2:
                write(rng.choice(files))
            elif not to.exists():
                to.parent.mkdir(exist_ok=True)
                source = rng.choice(files)
                source.rename(to) if op == 3 else to.write_bytes(source.read_bytes())
        up = load_source("tabular", str(hive), SourceOptions(cache_dir=str(tmp_path / "c")))
        fresh = load_source("tabular", str(hive), SourceOptions(cache_dir=str(tmp_path / f"f{r}")))
        assert up.fingerprint == fresh.fingerprint, r
        np.testing.assert_array_equal(up.train.arrays()[0], fresh.train.arrays()[0])
        np.testing.assert_array_equal(up.train.y, fresh.train.y)
        assert sorted(set(up.train.arrays()[0][:, 2].tolist())) == sorted(
            {float(f.parent.name[5:]) for f in hive.rglob("*.parquet")}), r


def test_a_file_outside_a_hive_folders_partitions_is_named_with_the_key(tmp_path):
    """A file beside the partition folders (written before the table was partitioned) lacks
    the key the others' paths give them: the message says so, for training and predict."""
    from export.card import InputSpec
    from export.readers import iter_chunks

    hive = tmp_path / "hive"
    (hive / "zone=1").mkdir(parents=True)
    pq.write_table(_table(1), hive / "zone=1" / "a.parquet")
    pq.write_table(_table(2), hive / "old.parquet")
    needle = (r"hive/old.parquet: missing column 'zone' \(its path holds no zone=<value> "
              r"folder, as the others do\); expected the columns")
    with pytest.raises(InputError, match=needle):
        load_source("tabular", str(hive), SourceOptions(cache_dir=str(tmp_path / "c")))
    spec = InputSpec(name="x", kind="tabular", dtype="float32", shape=(3,),
                     value_range=(-9.0, 9.0), columns=("a", "b", "zone"))
    with pytest.raises(InputError, match=needle):  # as `trainer predict` reads it
        list(iter_chunks(str(hive), spec, ["down", "up"], target="target"))


@pytest.mark.parametrize("bad", ["a.csv", "b.csv"])
def test_a_csv_header_that_is_not_utf8_is_named(tmp_path, bad):
    """A header pyarrow cannot decode as UTF-8 (a binary file named .csv) was a
    UnicodeDecodeError traceback where its names were first used: the folder's schema (the
    first file) or a later file's column check (found by corrupting random tables)."""
    folder = tmp_path / "t"
    folder.mkdir()
    for name in ("a.csv", "b.csv"):
        head = b"\xa6\xff" if name == bad else b""  # bytes that are no UTF-8 text
        (folder / name).write_bytes(head + b"a,b,target\n1,2,up\n")
    with pytest.raises(InputError, match=rf"t/{bad}: cannot read table .*'utf-8' codec can't "
                                         r"decode byte 0xa6"):
        load_source("tabular", str(folder), SourceOptions(cache_dir=str(tmp_path / "c")))


def test_a_date_partition_and_an_id_column_are_left_out_by_name(tmp_path):
    """Tables as they are kept: a hive folder partitioned by date (a string key) with an id
    column. Both are refused as features in one line that says how to leave them out;
    `exclude_columns` leaves them out of the features (and of the cache's rows), a name
    that is no column or is the target is one line too."""
    for day in ("2026-01-01", "2026-01-02"):
        part = tmp_path / "hive" / f"day={day}"
        part.mkdir(parents=True)
        t = _table(int(day[-1]))
        pq.write_table(t.append_column("id", pa.array([f"{day}-{i}" for i in range(40)])),
                       part / "part-0.parquet")
    root, opts = str(tmp_path / "hive"), {"cache_dir": str(tmp_path / "c")}
    with pytest.raises(InputError, match=r"feature column 'id' is string, expected numbers "
                                         r"\(a column that is not a feature: "
                                         r"--data.exclude_columns '\[id\]'\)$"):
        load_source("tabular", root, SourceOptions(**opts))
    with pytest.raises(InputError, match=r"feature column 'day' is string, expected numbers "
                                         r"\(a column that is not a feature: "
                                         r"--data.exclude_columns '\[id, day\]'\)$"):
        load_source("tabular", root, SourceOptions(exclude_columns=("id",), **opts))
    ds = load_source("tabular", root, SourceOptions(exclude_columns=("id", "day"), **opts))
    assert ds.input_spec.columns == ("a", "b") and len(ds.train) == 80
    assert ds.train.arrays()[0].shape == (80, 2)
    for name, what in (("target", "is the target"), ("zone", "is not a column of")):
        with pytest.raises(InputError, match=rf"data.exclude_columns: '{name}' {what}"):
            load_source("tabular", root, SourceOptions(exclude_columns=(name,), **opts))


@pytest.mark.parametrize("fmt,extra,message", [
    ("parquet", {"c": np.zeros(40)}, r"part-2.parquet: has column 'c', which the first file lacks"),
    ("parquet", {"b": np.array(["x"] * 40)}, r"part-2.parquet: column 'b' is string, expected double"),
    ("parquet", {"target": None}, r"part-2.parquet: missing column 'target'; expected the"),
    ("csv", {"c": np.zeros(40)}, r"part-2.csv: has column 'c', which the first file lacks"),
    ("csv", {"b": None}, r"part-2.csv: missing column 'b'; expected the columns"),
])
def test_a_table_file_that_differs_is_named(tmp_path, fmt, extra, message):
    """A file whose columns are not the first file's is named (a CSV file's by name only:
    its types are inferred from its own rows); a column missing was read as empty."""
    import pyarrow.csv as pacsv

    folder = tmp_path / "t"
    folder.mkdir()
    for i in range(3):
        t = _table(i)
        if i == 2:
            for name, values in extra.items():
                t = t.drop([name]) if values is None else (
                    t.set_column(t.schema.get_field_index(name), name, pa.array(values))
                    if name in t.column_names else t.append_column(name, pa.array(values)))
        (pq.write_table if fmt == "parquet" else pacsv.write_csv)(t, folder / f"part-{i}.{fmt}")
    with pytest.raises(InputError, match=message):
        load_source("tabular", str(folder), SourceOptions())


def test_a_csv_folder_whose_first_file_has_no_rows_is_trained_on(tmp_path):
    """A header-only CSV file first in the folder (an empty partition) leaves its columns
    untyped: they are typed by the next files, which are read whole."""
    import pyarrow.csv as pacsv

    folder = tmp_path / "t"
    (folder / "day=1").mkdir(parents=True)
    (folder / "day=1" / "part-0.csv").write_text("a,b,target\n")
    for i in (2, 3):
        (folder / f"day={i}").mkdir()
        pacsv.write_csv(_table(i), folder / f"day={i}" / "part-0.csv")
    ds = load_source("tabular", str(folder), SourceOptions(cache_dir=str(tmp_path / "c")))
    assert len(ds.train) == 80 and ds.input_spec.columns == ("a", "b", "day")
    assert sorted(ds.class_names) == ["down", "up"]


def test_table_roots_that_hold_no_table(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=r"notes.txt: expected .csv or .parquet files"):
        load_source("tabular", str(tmp_path), SourceOptions())
    with pytest.raises(InputError, match=r"nothing\*.csv: the pattern matches no files"):
        load_source("tabular", str(tmp_path / "nothing*.csv"), SourceOptions())
    with pytest.raises(InputError, match=r"absent: not found \(data.root\)"):
        load_source("tabular", str(tmp_path / "absent"), SourceOptions())


def test_a_corrupt_image_among_many_is_named_and_the_rest_is_kept(tmp_path):
    root, cache = _folder(tmp_path / "imgs", per_class=100), tmp_path / "cache"  # worker processes
    (root / "bee" / "050.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(InputError, match=r"bee/050.png: cannot decode image"):
        _load(root, cache)
    (root / "bee" / "050.png").unlink()
    kept = _cache_rows(cache)
    assert 0 < kept  # the files decoded before the bad one were committed
    _load(root, cache)
    assert _cache_rows(cache) == 299  # and not decoded again


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_file_that_is_not_a_regular_file_is_refused_not_read(tmp_path, kind):
    root = _folder(tmp_path / "imgs", per_class=2)
    odd = root / "bee" / "odd.png"
    if kind == "fifo":
        os.mkfifo(odd)  # reading it would block forever
    else:
        odd.symlink_to("/dev/zero")  # reading it would never end
    with pytest.raises(InputError, match=r"odd.png: not a regular file"):
        _load(root, tmp_path / "cache")


def test_a_broken_link_is_named_as_one(tmp_path):
    root = _folder(tmp_path / "imgs", per_class=2)
    (root / "bee" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(InputError, match=r"bee/gone.png: a broken link \(its target .*"
                                         r"nowhere.png does not exist\)$"):
        _load(root, tmp_path / "cache")


def test_a_cache_folder_that_cannot_be_written_is_one_line(tmp_path):
    from tests.conftest import assert_one_line_error, run_cli

    root = _folder(tmp_path / "imgs", per_class=2)
    (tmp_path / "file").write_text("a user's file")
    proc = run_cli("data", "--config", str(ROOT / "configs" / "image_folder.yaml"),
                   "--data.root", str(root), "--data.cache_dir", str(tmp_path / "file" / "c"),
                   "--out", str(tmp_path / "out.npz"))
    assert_one_line_error(proc, "file")
    assert (tmp_path / "file").read_text() == "a user's file"
    assert not (tmp_path / "out.npz").exists()


def test_the_index_keeps_every_byte_of_a_digest(tmp_path):
    from trainer.data.cache import Records
    from trainer.data.filestat import path_key

    columns, settings = {"x": ((2,), "u1")}, {"s": 1}
    digest = b"\x07" * 30 + b"\x00\x00"  # trailing NULs: numpy "S" strings would drop them
    key = path_key("a/\u00e9t\u00e9.png")
    with RowCache.open(tmp_path, columns, settings) as c:
        r = Records.empty(1)
        r.key[0], r.size[0], r.mtime_ns[0], r.ino[0], r.digest[0] = key, 3, 4, 5, digest
        r.start[0], r.count[0], r.check[0] = c.append(c.prepare({"x": np.array([[1, 2]], np.uint8)}))
        c.commit([(r, None)], final=True)
    with RowCache.open(tmp_path, columns, settings) as c:
        (row,) = c.lookup(np.array([key], "S16"))
        assert c.index.digest[row:row + 1].tobytes() == digest
        assert (c.index.size[row], c.index.mtime_ns[row], c.index.ino[row]) == (3, 4, 5)
        assert c.find(digest)[:2] == (0, 1) and c.check_rows(*c.find(digest))
        assert c.arrays()["x"][0].tolist() == [1, 2]


def test_an_output_over_a_file_of_the_data_folder_is_refused(tmp_path):
    from tests.conftest import assert_one_line_error, run_cli

    root = _folder(tmp_path / "imgs", per_class=2)
    victim = root / "ant" / "000.png"
    before = victim.read_bytes()
    proc = run_cli("data", "--config", str(ROOT / "configs" / "image_folder.yaml"),
                   "--data.root", str(root), "--data.cache_dir", str(tmp_path / "c"),
                   "--out", str(victim))
    assert_one_line_error(proc, "is a file inside --data.root")
    assert victim.read_bytes() == before


def test_an_output_over_the_cache_s_own_index_is_refused(tmp_path):
    """The decoded-row cache is an input of `trainer data`: --out naming its index (the
    cache folder given by flag, by a config file, or the default one, FROZENFIT_CACHE) is
    refused (in one line, before any work, where the flags name it), the index's bytes
    untouched; overwritten, the next run would decode every file again."""
    from tests.conftest import assert_one_line_error, run_cli

    root = _folder(tmp_path / "imgs", per_class=12)
    (tmp_path / "cache.yaml").write_text(f"data:\n  cache_dir: {tmp_path / 'cfg-cache'}\n")
    config = ["--config", str(ROOT / "configs" / "image_folder.yaml")]
    for folder, flags, env in (
            ("c", ["--data.cache_dir", str(tmp_path / "c")], {}),
            ("home-cache", [], {"FROZENFIT_CACHE": str(tmp_path / "home-cache")}),
            ("cfg-cache", ["--config", str(tmp_path / "cache.yaml")], {})):
        first = run_cli("data", *config, "--data.root", str(root), *flags,
                        "--out", str(tmp_path / "test.npz"), env=env)
        assert first.returncode == 0, first.stderr
        (index,) = (tmp_path / folder).rglob("index.npz")
        before = index.read_bytes()
        proc = run_cli("data", *config, "--data.root", str(root), *flags,
                       "--out", str(index), env=env)
        if folder == "cfg-cache":  # known once the config is read: after the log's line
            assert proc.returncode == 2 and "is a file inside data.cache_dir" in \
                proc.stderr.strip().splitlines()[-1] and "Traceback" not in proc.stderr
        else:
            assert_one_line_error(proc, "is a file inside --data.cache_dir")
        assert index.read_bytes() == before


def _ingest_texts(cache_dir: Path, root: Path, **kw):
    """update() over small text files, each decoded to one row of its first 4 bytes."""
    from trainer.data.ingest import update

    def decode(data, path):
        return {"x": np.frombuffer(data[:4], np.uint8)[None]}

    paths = sorted(str(p) for p in root.iterdir())
    with RowCache.open(cache_dir, {"x": ((4,), "u1")}, {"t": 1}) as c:
        records, report = update(c, root, paths, decode, **kw)
        rows = c.arrays()["x"][records.start]
        gens = sorted(p.name for p in cache_dir.glob("x.*.bin"))
    return paths, rows, report, gens


def test_compaction_moves_the_rows_the_returned_records_point_at(tmp_path):
    """When removed files leave over half of the cache dead, the live rows are copied into
    a new generation; the records an update returns must point at the moved rows."""
    root = tmp_path / "texts"
    root.mkdir()
    for i in range(1500):
        (root / f"{i:05d}.txt").write_bytes(f"{i:04d}".encode())
    _ingest_texts(tmp_path / "c", root)
    for i in range(1500):
        if i % 5:
            (root / f"{i:05d}.txt").unlink()
    paths, rows, report, gens = _ingest_texts(tmp_path / "c", root)
    assert report.removed == 1200 and report.decoded == 0
    assert gens == ["x.1.bin"]  # compacted
    assert [bytes(r).decode() for r in rows] == [Path(p).read_text() for p in paths]
    paths, rows, report, _ = _ingest_texts(tmp_path / "c", root, verify=True)
    assert report.decoded == 0 and len(rows) == 300
    assert [bytes(r).decode() for r in rows] == [Path(p).read_text() for p in paths]


@pytest.mark.parametrize("block", [1 << 16, 8])
@pytest.mark.parametrize("where", ["first", "last", "added", "inserted", "removed"])
def test_a_change_found_past_the_first_blocks_of_stats_is_caught(tmp_path, monkeypatch, where,
                                                                 block):
    """A start compares the listing's stats with the index block by block and makes the
    records only from the first block that differs: a change in any block (or a file added
    or removed) is found, and the records of the blocks before it are the index's own.
    With blocks of 8 files completed at a time, the blocks after a change are spilled
    (copied from the index where they are unchanged), those before it kept in place, and
    the blocks after a file added or removed are matched with the index's records shifted
    by it, not looked up by key (counted); a file changed in place is not looked up at all."""
    from trainer.data import ingest
    from trainer.data.cache import RowCache

    looked_up, lookup = [], RowCache.lookup

    def counting(self, keys, **kw):
        looked_up.append(len(keys))
        return lookup(self, keys, **kw)

    monkeypatch.setattr(RowCache, "lookup", counting)
    monkeypatch.setattr(ingest, "STAT_BLOCK", 4)
    monkeypatch.setattr(ingest, "READ_ROWS", block)
    root = tmp_path / "texts"
    root.mkdir()
    for i in range(30):
        (root / f"{i:03d}.txt").write_bytes(f"{i:04d}".encode())
    _aged(root)  # records the index can vouch for: only the change is looked up
    _, _, report, _ = _ingest_texts(tmp_path / "c", root)
    assert report.decoded == 30
    _, _, report, _ = _ingest_texts(tmp_path / "c", root)
    assert (report.new, report.changed, report.decoded) == (0, 0, 0)
    changed = {"first": "001", "last": "029", "added": "030", "inserted": "0015",
               "removed": "017"}[where]
    if where == "removed":
        (root / f"{changed}.txt").unlink()
    else:
        (root / f"{changed}.txt").write_bytes(b"new!")  # 0015.txt lies between 001 and 002
    looked_up.clear()
    paths, rows, report, _ = _ingest_texts(tmp_path / "c", root)
    assert (report.new, report.changed, report.removed, report.decoded) == {
        "first": (0, 1, 0, 1), "last": (0, 1, 0, 1), "added": (1, 0, 0, 1),
        "inserted": (1, 0, 0, 1), "removed": (0, 0, 1, 0)}[where]
    if block == 8:  # the block holding the change, not the 22-31 files after it
        assert sum(looked_up) <= 8, looked_up
    if where in ("first", "last"):  # changed in place: its path where it was, no lookup
        assert looked_up == []
    assert [bytes(r).decode() for r in rows] == [Path(p).read_text() for p in paths]
    # The new index, written from the records kept in place and the spilled ones, is
    # marked as holding each path once: a start does not sort it to find their last ones.
    meta = StoredIndex(tmp_path / "c" / "index.npz").read("meta")
    assert json.loads(meta.tobytes())["unique"] is True
    _, _, report, _ = _ingest_texts(tmp_path / "c", root)  # the new index holds every stat
    assert (report.new, report.changed, report.removed, report.decoded) == (0, 0, 0, 0)


@pytest.mark.parametrize("seed", range(4))
def test_seeded_rounds_of_changes_agree_with_the_files_and_a_fresh_ingest(tmp_path, monkeypatch,
                                                                         seed):
    """Rounds of files added, removed, rewritten (same size or not), renamed and copied
    (content the cache holds), drawn from a seed, with pieces of 1-7 files and blocks of
    4-16, so changes land at piece and block edges and shift the files after them: after
    each update its rows are the files' contents, it counts exactly the files added, removed
    and rewritten, the next update finds nothing to do, and a fresh ingest has the same rows."""
    import random

    from trainer.data import ingest

    rng = random.Random(seed)
    monkeypatch.setattr(ingest, "STAT_BLOCK", rng.choice([1, 2, 3, 7]))
    monkeypatch.setattr(ingest, "READ_ROWS", rng.choice([4, 5, 8, 16]))
    root = tmp_path / "texts"
    root.mkdir()
    for _ in range(rng.randrange(20, 80)):
        (root / f"{rng.randrange(1000):03d}.txt").write_bytes(f"{rng.randrange(50):04d}".encode())
    _aged(root)
    _ingest_texts(tmp_path / "c", root)
    for r in range(8):
        before, written = {p.name for p in root.iterdir()}, set()
        for _ in range(rng.randrange(1, 10)):
            names = sorted(p.name for p in root.iterdir())
            op, name = rng.choice(["add", "remove", "rewrite", "rename", "copy"]), \
                f"{rng.randrange(1000):03d}.txt"
            if op == "remove" and len(names) > 1:
                (root / rng.choice(names)).unlink()
            elif op in ("rename", "copy") and not (root / name).exists():
                source = root / rng.choice(names)
                if op == "rename":
                    source.rename(root / name)
                else:
                    (root / name).write_bytes(source.read_bytes())
                written.add(name)
            elif op in ("add", "rewrite"):
                name = name if op == "add" else rng.choice(names)
                text = f"{rng.randrange(50):04d}" + "+" * rng.randrange(2)  # size kept or not
                (root / name).write_text(text)
                written.add(name)
        now, hour_ago = {p.name for p in root.iterdir()}, time.time_ns() - 3600 * 10**9
        for name in written & now:  # not racily clean (filestat.py): their stats are trusted
            os.utime(root / name, ns=(hour_ago, hour_ago))
        paths, rows, report, _ = _ingest_texts(tmp_path / "c", root)
        assert [bytes(x) for x in rows] == [Path(p).read_bytes()[:4] for p in paths], r
        assert (report.new, report.removed, report.changed) == (
            len(now - before), len(before - now), len(written & now & before)), r
        _, _, again, _ = _ingest_texts(tmp_path / "c", root)
        assert (again.new, again.changed, again.removed, again.decoded) == (0, 0, 0, 0), r
        _, fresh, _, _ = _ingest_texts(tmp_path / f"fresh{r}", root)
        np.testing.assert_array_equal(fresh, rows)


@pytest.mark.parametrize("block, on_disk", [(1 << 16, False), (16, False), (16, True)])
def test_duplicate_files_in_one_ingest_share_their_rows(tmp_path, monkeypatch, block, on_disk):
    """With blocks of 16 files, most duplicates are of files spilled in earlier blocks;
    `on_disk`: past 8 contents the appended digests lie in a table on disk."""
    from trainer.data import ingest
    from trainer.data.appended import Appended

    monkeypatch.setattr(ingest, "READ_ROWS", block)
    if on_disk:
        monkeypatch.setattr(Appended, "MERGE", 4)
        monkeypatch.setattr(Appended, "HELD", 8)
    root = tmp_path / "texts"
    root.mkdir()
    for i in range(100):
        (root / f"{i:03d}.txt").write_bytes(f"{i % 40:04d}".encode())  # 40 contents
    paths, rows, report, _ = _ingest_texts(tmp_path / "c", root)
    assert report.new == 100 and report.decoded == 40
    assert (tmp_path / "c" / "x.0.bin").stat().st_size == 40 * 4
    assert [bytes(r).decode() for r in rows] == [Path(p).read_text() for p in paths]


@pytest.mark.parametrize("move", [1 << 16, 5])
def test_the_appended_digests_stay_findable_across_merges(monkeypatch, move):
    """Merged in place (the entries there moved up `move` at a time), every digest keeps
    its row and the prefixes stay sorted; digests that share their first 4 bytes (made
    here: every tenth) each find their own row, and one absent finds none."""
    import hashlib

    from trainer.data.appended import Appended

    monkeypatch.setattr(Appended, "MERGE", 7)
    monkeypatch.setattr(Appended, "MOVE", move)
    appended = Appended()
    digests = [hashlib.sha256(str(i).encode()).digest() for i in range(100)]
    digests = [b"\x01\x02\x03\x04" + d[4:] if i % 10 == 0 else d for i, d in enumerate(digests)]
    column = np.frombuffer(b"".join(digests), "S32")
    for i, d in enumerate(digests[:60]):
        appended.add(d, i)
    assert len(appended.prefix) == 56 and np.all(np.diff(appended.prefix.astype(np.int64)) >= 0)
    assert [appended.get(d, lambda j: column[j:j + 1].tobytes()) for d in digests[:60]] == list(range(60))
    assert all(appended.get(d, lambda j: column[j:j + 1].tobytes()) is None for d in digests[60:])


def test_the_index_finds_keys_and_digests_that_share_their_first_bytes(tmp_path, monkeypatch):
    """The index is searched by the first 4 bytes of a key or digest and checked whole:
    values that share those bytes (1 in 2**32 a pair; made here) each find their own
    record, and one that shares them with no record finds none, read from the stored
    index and from one in memory, in one block of values and across blocks."""
    from trainer.data import cache as cache_module
    from trainer.data.records import Records

    columns = {"x": ((1,), "u1")}
    n, rng = 40, np.random.default_rng(5)
    raw = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    raw[:, :4] = raw[n // 2:n // 2 + 1, :4]  # half the values share their first 4 bytes ...
    raw[n // 2:, :4] = 7  # ... the other half other ones
    digest, key = raw.view("S32").reshape(-1), raw[:, 8:24].copy().view("S16").reshape(-1)
    key[: n // 2] = np.ascontiguousarray(raw[: n // 2, :16]).view("S16").reshape(-1)
    records = Records.empty(n)
    records.key[:], records.digest[:] = key, digest
    records.start[:], records.count[:] = np.arange(n), 1
    with RowCache.open(tmp_path / "c", columns, {"t": 1}) as c:
        c.append(c.prepare({"x": np.zeros((n, 1), np.uint8)}))
        c.commit([(records, None)], final=True)
    lost = raw[[0, n - 1]].copy()
    lost[:, 31] ^= 0xFF  # the first bytes of a record's, the rest of none
    lost_keys = key[[0, n - 1]].copy().view(np.uint8).reshape(2, 16)
    lost_keys[:, 15] ^= 0xFF
    lost_keys = lost_keys.view("S16").reshape(-1)
    for block in (1000, 3):
        monkeypatch.setattr(cache_module, "READ_ROWS", block)
        with RowCache.open(tmp_path / "c", columns, {"t": 1}) as c:
            for stored in (True, False):
                if not stored:
                    c._set_index(Records(**{k: np.array(v) for k, v in
                                            c.index.columns().items()}))
                order = rng.permutation(n)
                assert c.lookup(key[order]).tolist() == order.tolist()
                assert [c.find(digest[i:i + 1].tobytes())[0] for i in order] == order.tolist()
                assert c.lookup(lost_keys).tolist() == [-1, -1]
                assert c.find(lost[1].tobytes()) is None


def test_a_gather_with_a_few_strays_reads_spans_not_the_whole_column(tmp_path):
    """Matches that follow the listing with a few strays (another key's record met first
    by its 4-byte prefix) are read as a few spans: the column is not read whole (at a
    million files, 16 MB held for a search that needs a block); rows scattered all over
    still read it whole, once."""
    from trainer.data.records import Records

    n = 20000
    records = Records.empty(n)
    records.key[:] = np.arange(n).astype(">u8").view("S8").astype("S16")
    records.start[:], records.count[:] = np.arange(n), 1
    with RowCache.open(tmp_path / "c", {"x": ((1,), "u1")}, {"t": 1}) as c:
        c.append(c.prepare({"x": np.zeros((n, 1), np.uint8)}))
        c.commit([(records, None)], final=True)
    with RowCache.open(tmp_path / "c", {"x": ((1,), "u1")}, {"t": 1}) as c:
        rows = np.r_[np.arange(5000, 6000), [17, 19999, 12000]].astype(np.int32)
        assert c.index.gather("start", rows).tolist() == rows.tolist()
        assert "start" not in c.index.__dict__
        scattered = np.arange(0, n, 97)[::-1]
        assert c.index.gather("start", scattered).tolist() == scattered.tolist()
        assert "start" in c.index.__dict__


def test_the_appended_digests_merge_ever_less_often(monkeypatch):
    """Each merge copies the sorted columns, so merging every MERGE files would copy
    quadratically; past 32 * MERGE files a merge waits for 1/32 of the columns."""
    import hashlib

    from trainer.data.appended import Appended

    monkeypatch.setattr(Appended, "MERGE", 7)
    monkeypatch.setattr(Appended, "MOVE", 100)
    appended = Appended()
    digests = [hashlib.sha256(str(i).encode()).digest() for i in range(5000)]
    column = np.frombuffer(b"".join(digests), "S32")
    merges, size = 0, 0
    for i, d in enumerate(digests):
        appended.add(d, i)
        merges += len(appended.prefix) != size
        size = len(appended.prefix)
    assert merges < 150  # a merge every 7 files: 714
    assert np.all(np.diff(appended.prefix.astype(np.float64)) >= 0)
    assert [appended.get(d, lambda j: column[j:j + 1].tobytes()) for d in digests[::37]] == list(range(0, 5000, 37))


def test_relative_roots_in_the_working_folder_are_read(tmp_path, monkeypatch):
    """`--data.root wine.csv` or `--data.root .` as a user types them, from the folder the
    data is in (a relative root once failed: its files did not start with "./")."""
    monkeypatch.chdir(tmp_path)
    pq.write_table(_table(0), "t.parquet")
    ds = load_source("tabular", "t.parquet", SourceOptions(cache_dir=str(tmp_path / "c")))
    assert len(ds.train) == 40
    images = _folder(tmp_path / "imgs")
    monkeypatch.chdir(images)
    assert len(_load(Path("."), tmp_path / "c2").train) == 60


def _update_peak(tmp_path: Path, n: int, again: bool = False, change: bool = False) -> int:
    """Traced peak memory (bytes) of update() over n new one-row files listed as the image
    folder lists them, committed every ~1,000 files; with `again`, of opening the cache
    and updating it a second time, nothing changed, or with `change`, after every 100th
    file was rewritten and n/100 files added."""
    import tracemalloc

    from trainer.data.ingest import update
    from trainer.data.paths import PathList

    root = tmp_path / f"f{n}"
    root.mkdir()
    for i in range(n):
        (root / f"{i:06d}.txt").write_bytes(i.to_bytes(4, "little"))
    _aged(root)  # records the next update can trust: not read again
    paths = PathList(str(root))
    paths.extend(f"{i:06d}.txt" for i in range(n))
    for run in ((0, 1) if again or change else (1,)):
        if run and change:
            for i in range(0, n, 100):
                (root / f"{i:06d}.txt").write_bytes((7 * n + i).to_bytes(4, "little"))
            for i in range(n, n + n // 100):
                (root / f"{i:06d}.txt").write_bytes(i.to_bytes(4, "little"))
            paths.extend(f"{i:06d}.txt" for i in range(n, n + n // 100))
        if run:
            tracemalloc.start()
        try:
            with RowCache.open(tmp_path / f"c{n}", {"x": ((4,), "u1")}, {"t": 1}) as c:
                records, report = update(
                    c, root, paths, lambda data, _: {"x": np.frombuffer(data, np.uint8)[None]})
                peak = tracemalloc.get_traced_memory()[1]
                assert len(c.index) == len(paths)
                last = len(paths) - 1
                assert (c.arrays()["x"][records.start[-1]].tolist()
                        == list(last.to_bytes(4, "little")))
        finally:
            tracemalloc.stop()
    assert report.decoded == (2 * (n // 100) if change else 0 if again else n)
    return peak


@pytest.mark.slow  # ~20 s: 18,000 files made, hashed and decoded under tracemalloc
def test_an_ingest_costs_a_bounded_number_of_bytes_per_file(tmp_path, monkeypatch):
    """The bookkeeping of a first ingest beyond its listing is the appended digests'
    columns (8 bytes a file: their first 4 bytes and places): the new records (96 bytes a
    file) are written to a spill file a block of files at a time, never held whole, and the
    digests' columns are merged in place; never a Python object per file or a copy of the
    index at each commit (which cost ~500): measured 12 bytes a file (20 with 8-byte
    prefixes and places, ~22 with np.insert's copies at each merge, 121-125 when the records
    were held; 1,000,000 files, peak RSS: docs/benchmarks.md, run K). Measured as
    the growth of the traced peak from 3,000 to 15,000 files, with blocks of 1,024 rows (as
    at scale, where a block is a small part of the files; blocks larger than the test's
    files would count as growth)."""
    from trainer.data import cache, ingest, records
    from trainer.data.appended import Appended

    monkeypatch.setattr(cache, "COMMIT_BYTES", 4000)  # a commit every 1,000 files
    monkeypatch.setattr(Appended, "MERGE", 256)  # its dict of the latest: small
    monkeypatch.setattr(Appended, "MOVE", 1024)
    monkeypatch.setattr(ingest, "BLOCK", 32)  # results decoded ahead: few (their number
    # when the peak is reached depends on the threads' timing)
    for module in (cache, records, ingest):
        for name in ("READ_ROWS", "WRITE_ROWS"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, 1024)
    small, large = _update_peak(tmp_path, 3000), _update_peak(tmp_path, 15000)
    per_file = (large - small) / 12000
    assert per_file < 20, f"{per_file:.0f} bytes per file ({small=}, {large=})"


@pytest.mark.slow  # ~20 s
def test_a_start_with_nothing_changed_holds_the_index_once(tmp_path, monkeypatch):
    """Opening the cache and updating it when no file changed holds next to nothing per
    file (measured 29 bytes; the listing is made before): the index's key and stat columns
    are read block by block and compared with the listing's stats as they are made, and
    its other columns are read when first used (the rows' starts and digests, by the
    caller). 239 bytes a file when a whole index was loaded and sorted to find each path's
    last record, 189 with the listing's stats kept as records, 103 with the index loaded
    whole. Measured as the growth of the traced peak from 3,000 to 15,000 files, with small
    blocks of stats (their fixed cost would hide the rest)."""
    from trainer.data import cache, ingest

    monkeypatch.setattr(cache, "COMMIT_BYTES", 4000)  # the first ingest commits as it goes
    monkeypatch.setattr(ingest, "STAT_BLOCK", 64)
    small, large = (_update_peak(tmp_path, n, again=True) for n in (3000, 15000))
    per_file = (large - small) / 12000
    assert per_file < 50, f"{per_file:.0f} bytes per file ({small=}, {large=})"


@pytest.mark.slow  # ~25 s
def test_an_update_of_a_few_files_costs_a_bounded_number_of_bytes_per_file(tmp_path,
                                                                            monkeypatch):
    """An update after 1% of the files changed and 1% were added holds, for the search of
    the index, the first 4 bytes of each key and digest with their order (8 bytes each);
    the new records are spilled a block at a time, the index's columns gathered a block of
    the listing at a time, never read whole, sorted whole or indexed with whole
    temporaries (measured 20 bytes a file, 36 with 8-byte prefixes and places; 157 with the
    new records held, 285 with whole columns)."""
    from trainer.data import cache, ingest, records

    monkeypatch.setattr(cache, "COMMIT_BYTES", 4000)
    monkeypatch.setattr(ingest, "BLOCK", 32)  # few results decoded ahead
    for module in (cache, ingest, records):  # blocks of the index small: their cost is fixed
        monkeypatch.setattr(module, "READ_ROWS", 1024)
    small, large = (_update_peak(tmp_path, n, change=True) for n in (3000, 15000))
    per_file = (large - small) / 12000
    assert per_file < 40, f"{per_file:.0f} bytes per file ({small=}, {large=})"


def test_the_packed_listing_gives_back_every_name_and_its_key(tmp_path, monkeypatch):
    """Names that are not UTF-8 (raw bytes, as Linux allows) and roots spelled "." keep
    their exact bytes through the listing: the same path to open, the same path key."""
    from trainer.data import ingest
    from trainer.data.filestat import path_key
    from trainer.data.paths import PathList

    names = ["a/\u00e9t\u00e9.png", os.fsdecode(b"b/\xff\xfe.png"), "c.png"]
    for i, name in enumerate(names):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x" * (i + 1))
    with pytest.raises(ValueError, match="must lie under"):
        PathList.of(str(tmp_path / "a"), [str(tmp_path / "c.png")])
    monkeypatch.chdir(tmp_path)
    for root, spelled in ((str(tmp_path), [str(tmp_path / n) for n in names]), (".", names)):
        paths = PathList.of(root, spelled)
        assert list(paths) == spelled and [paths.rel(i) for i in range(3)] == names
        with RowCache.open(tmp_path / "cache", {"x": ((1,), "u1")}, {}) as empty:
            records, at, _ = ingest._stat_block(ingest._Stats(paths).submit(0, 3), 0, 3, empty,
                                                verify=False, shift=0)
        assert [records.key[i:i + 1].tobytes() for i in range(3)] == [path_key(n) for n in names]
        assert records.size.tolist() == [1, 2, 3] and at.tolist() == [-1, -1, -1]


def test_an_image_with_a_name_that_is_not_utf8_is_ingested(tmp_path):
    root = _folder(tmp_path / "imgs", per_class=4)
    os.rename(root / "bee" / "001.png", os.fsencode(root / "bee") + b"/\xff1.png")
    ds = _load(root, tmp_path / "c")
    assert len(ds.train) == 12 and ds.fingerprint == _load(root, tmp_path / "fresh").fingerprint


def _table_peak(tmp_path: Path, n: int) -> int:
    """Traced peak memory (bytes) of loading a fresh 2-feature table of n rows with an
    integer class column (the cached rows are on disk; memory holds the dataset's row and
    label columns)."""
    import tracemalloc

    rng = np.random.default_rng(n)
    pq.write_table(pa.table({"a": rng.normal(size=n), "b": rng.normal(size=n),
                             "target": rng.integers(0, 5, n)}), tmp_path / f"t{n}.parquet")
    tracemalloc.start()
    try:
        ds = load_source("tabular", str(tmp_path / f"t{n}.parquet"),
                         SourceOptions(cache_dir=str(tmp_path / f"c{n}")))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(ds.train) == n and ds.class_names == ["0", "1", "2", "3", "4"]
    return peak


def test_a_table_holds_its_row_and_label_columns_and_no_copy_of_them(tmp_path, monkeypatch):
    """Besides its rows' places and labels (16 bytes a row, what a sampler holds anyway), a
    table's load holds a block of its cached target at a time: not the whole column read
    back, its integer codes and a second array of places beside them. Measured as the
    growth of the traced peak from 100,000 to 400,000 rows: 5 bytes a row (the decode's
    fixed peak still dominates at this size), 31 before."""
    from trainer.data import tabular

    monkeypatch.setattr(tabular, "GATHER_ROWS", 1 << 14)
    small, large = _table_peak(tmp_path, 100_000), _table_peak(tmp_path, 400_000)
    per_row = (large - small) / 300_000
    assert per_row < 22, f"{per_row:.1f} bytes per row ({small=}, {large=})"


def test_the_files_fingerprint_depends_on_content_not_on_order():
    """Each (split, label) group's digests are sorted on their own: files in another order
    within their group, or groups listed in another order, give the same fingerprint; a
    changed digest, label or split gives another; a listing with a group split in two is a
    caller's error, not a silent second fingerprint."""
    from trainer.data.dataset import files_fingerprint
    from trainer.data.records import Records

    rng = np.random.default_rng(3)
    split = np.repeat(np.array([0, 0, 1, 1], np.int8), [30, 20, 10, 5])
    label = np.repeat(np.array([0, 1, 0, 1]), [30, 20, 10, 5])
    digest = rng.integers(0, 3, (65, 32), dtype=np.uint8).view("S32").reshape(-1)

    def fp(order, s=split, y=label, d=digest):
        records = Records.empty(len(order))
        records.digest[:] = d[order]
        return files_fingerprint("{}", ["a", "b"], ["train", "test"], s[order], y[order], records)

    same = fp(np.arange(65))
    within = np.concatenate([rng.permutation(np.arange(a, b)) for a, b in
                             ((0, 30), (30, 50), (50, 60), (60, 65))])
    groups = np.concatenate([np.arange(60, 65), np.arange(30, 50), np.arange(0, 30),
                             np.arange(50, 60)])
    assert fp(within) == fp(groups) == same
    changed = digest.copy()
    changed[7] = b"\x01" * 32
    assert fp(np.arange(65), d=changed) != same
    assert fp(np.arange(65), y=np.where(np.arange(65) == 60, 0, label)) != same
    with pytest.raises(ValueError, match="listed together"):
        fp(np.concatenate([np.arange(0, 10), np.arange(30, 50), np.arange(10, 30),
                           np.arange(50, 65)]))


def test_a_large_groups_digests_are_sorted_a_bucket_at_a_time(tmp_path, monkeypatch):
    """A (split, label) group larger than a bucket is sorted through a scratch file, a
    bucket at a time: the same fingerprint as one sort in memory (uniform digests, and
    digests of few distinct first bytes, whose buckets are uneven), and memory that does not
    grow with the group (the traced peak grows < 4 bytes a file from 20,000 to 80,000 files;
    a whole sort held 40)."""
    import tracemalloc

    from trainer.data import bucketsort
    from trainer.data.dataset import files_fingerprint
    from trainer.data.records import Records

    rng = np.random.default_rng(5)

    def records_of(digests):
        records = Records.empty(len(digests))
        records.digest[:] = digests
        return records

    def fp(records, n):
        split, label = np.zeros(n, np.int8), np.repeat(np.array([0, 1], np.int8), [n - 3, 3])
        return files_fingerprint("{}", ["a", "b"], ["train"], split, label, records, tmp_path)

    uniform = rng.integers(0, 256, (5000, 32), dtype=np.uint8).view("S32").reshape(-1)
    few = rng.integers(0, 3, (5000, 32), dtype=np.uint8).view("S32").reshape(-1)
    whole = [fp(records_of(d), 5000) for d in (uniform, few)]
    monkeypatch.setattr(bucketsort, "SORT_ROWS", 64)
    monkeypatch.setattr(bucketsort, "READ_ROWS", 700)
    assert [fp(records_of(d), 5000) for d in (uniform, few)] == whole
    assert not list(tmp_path.iterdir())  # the scratch file was unnamed
    monkeypatch.setattr(bucketsort, "SORT_ROWS", 1024)
    monkeypatch.setattr(bucketsort, "READ_ROWS", 4096)
    peaks = []
    for n in (20_000, 80_000):
        records = records_of(rng.integers(0, 256, (n, 32), dtype=np.uint8).view("S32").reshape(-1))
        tracemalloc.start()
        try:
            fp(records, n)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    per_file = (peaks[1] - peaks[0]) / 60_000
    assert per_file < 4, f"{per_file:.1f} bytes a file ({peaks})"


def test_hash_values_are_ordered_as_numpys_stable_sort_orders_them():
    """bucketsort.stable_order sorts by the first 8 bytes, then the tied rows by their whole
    bytes and place: the same order as np.argsort(kind="stable"), so fingerprints and
    snapshots are those earlier versions wrote, for values with many ties in their first 8
    bytes (the same content) and zero bytes, as for uniform ones."""
    from trainer.data.bucketsort import stable_order

    rng = np.random.default_rng(11)
    for dtype in ("S16", "S32", ">u8"):
        width = np.dtype(dtype).itemsize
        for n, high in ((0, 256), (1, 256), (5000, 256), (5000, 3), (5000, 2)):
            raw = rng.integers(0, high, (n, width), dtype=np.uint8)
            raw[: n // 2, :8] = 0  # half share their first 8 bytes
            values = raw.view(dtype).reshape(-1)
            assert np.array_equal(stable_order(values), np.argsort(values, kind="stable")), \
                (dtype, n, high)


def test_the_runs_of_a_split_and_label_are_found_across_blocks(monkeypatch):
    """The fingerprint's groups (runs of files with the same split and label) are found a
    block of files at a time: the same starts as whole differences of the columns, with
    runs that start on, before and after a block's edge."""
    from trainer.data import dataset

    monkeypatch.setattr(dataset, "FINGERPRINT_BLOCK", 1)  # blocks of 8 files
    rng = np.random.default_rng(3)
    for n in (0, 1, 8, 9, 17, 500):
        splits = np.sort(rng.integers(0, 3, n)).astype(np.int8)
        labels = np.repeat(rng.integers(0, 4, n), rng.integers(1, 9, n))[:n]
        whole = np.flatnonzero(np.diff(splits, prepend=-1) | np.diff(labels, prepend=-2))
        assert dataset._group_starts(splits, labels).tolist() == whole.tolist()


def test_the_live_rows_count_shared_and_multi_row_records_once(monkeypatch):
    """Whether a commit compacts is decided by the rows the records point at: rows shared
    by files of the same content count once, a table file's run of rows all count, a file
    with no rows none; across blocks of records and parts with masks."""
    from trainer.data import records as rec

    monkeypatch.setattr(rec, "WRITE_ROWS", 4)
    rng = np.random.default_rng(8)
    r = rec.Records.empty(30)
    r.start[:] = rng.integers(0, 200, 30)
    r.count[:] = rng.choice([0, 1, 1, 1, 5], 30)
    r.start[5], r.count[5] = r.start[4], r.count[4]  # the same content twice
    mask = rng.random(30) < 0.7
    parts = [(r, None), (r, mask)]
    expected = {row for i in range(30) for row in range(r.start[i], r.start[i] + r.count[i])}
    assert rec.live_rows(parts, 220) == len(expected)
    assert rec.live_rows([(r, mask)], 220) == len(
        {row for i in np.flatnonzero(mask) for row in range(r.start[i], r.start[i] + r.count[i])})


def test_an_ingest_that_fails_keeps_the_files_it_completed(tmp_path, monkeypatch):
    """A disk that fills while an update spills its third block of records: the error is
    raised, and the records of the files completed so far (the two blocks spilled and the
    third one's, still held) are committed with their rows: the next run decodes the rest
    only, and its rows are right."""
    import errno

    from trainer.data import ingest, records

    monkeypatch.setattr(ingest, "READ_ROWS", 10)
    root = tmp_path / "texts"
    root.mkdir()
    for i in range(45):
        (root / f"{i:03d}.txt").write_bytes(f"{i:04d}".encode())
    real, calls = records.Spill.append, [0]

    def filling(self, *args):
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args)

    monkeypatch.setattr(records.Spill, "append", filling)
    with pytest.raises(OSError, match="No space left"):
        _ingest_texts(tmp_path / "c", root)
    monkeypatch.setattr(records.Spill, "append", real)
    paths, rows, report, _ = _ingest_texts(tmp_path / "c", root)
    assert (report.new, report.decoded) == (15, 15)
    assert [bytes(r).decode() for r in rows] == [Path(p).read_text() for p in paths]


def test_freed_heap_blocks_are_given_back_after_an_ingest_block(tmp_path):
    """`release_free_memory` (called once a block of the listing is ingested) gives the
    pages of freed heap blocks back to the OS, those inside the heap too: blocks of 1 MiB
    taken from the heap (as `trainer fit`'s allocator settings make them), each followed by
    a small block that stays, then freed, stay resident until it is called. Measured in a
    fresh process: 200 MiB freed, RSS falls by almost all of it."""
    import subprocess
    import sys

    script = """
import gc, json
from trainer.allocator import release_free_memory, tune_cpu_allocator
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:"))
tune_cpu_allocator()  # blocks up to 32 MiB from the heap, kept when freed
big, pins = [], []
for i in range(200):
    big.append(bytearray(1 << 20))
    pins.append(bytearray(64))
del big
gc.collect()
before = rss()
release_free_memory()
print(json.dumps([before, rss()]))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parents[1])
    before, after = json.loads(proc.stdout)
    assert before - after > 150 * 1024, f"RSS {before} -> {after} KiB"


def test_a_cache_folder_that_is_a_file_is_one_line_and_the_file_kept(tmp_path):
    """`--data.cache_dir` naming a file: the listing, written there first, says so in one
    line (it said "File exists"), exit 2, and the file is not touched."""
    images = _folder(tmp_path / "imgs", per_class=2)
    afile = tmp_path / "afile"
    afile.write_text("a user's file")
    proc = run_cli("data", "--config", str(ROOT / "configs" / "image_folder.yaml"),
                   "--data.root", str(images), "--data.cache_dir", str(afile),
                   "--out", str(tmp_path / "d.npz"))
    assert_one_line_error(proc, str(afile), "not a folder")
    assert afile.read_text() == "a user's file" and not (tmp_path / "d.npz").exists()
