"""Bringing a dataset's row cache up to date with its files: only what is new or changed is
read, only content the cache lacks is decoded (in worker processes for images), block by
block so memory holds one block of decoded rows."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import stat as stat_module
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.children import die_with_parent
from export.errors import InputError
from export.timing import usable_cores
from trainer.data.cache import FileStat, Records, RowCache, path_key
from trainer.data.records import READ_ROWS
from trainer.data.paths import PathList

BLOCK = 512  # files read, hashed and decoded together by the thread pool


@dataclass
class UpdateReport:
    files: int = 0
    new: int = 0
    changed: int = 0
    removed: int = 0
    decoded: int = 0  # files decoded (the others were unchanged or had known content)
    seconds: float = 0.0

    def line(self, what: str) -> str:
        return (f"{self.files:,} {what}: {self.new:,} new, {self.changed:,} changed, "
                f"{self.removed:,} removed; decoded {self.decoded:,} in {self.seconds:.1f} s")


def _read(path: str, stat: FileStat) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(stat.size + 1)
        after = FileStat.of(path)
    except FileNotFoundError:
        raise InputError(f"{path}: disappeared during ingest") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    if len(data) != stat.size or after != stat:
        raise InputError(f"{path}: changed while it was being read; run again when the "
                         f"dataset is no longer being written")
    return data


def _hash_file(path: str, stat: FileStat) -> bytes:
    """SHA-256 of a file read in 4 MiB pieces (a table file may be larger than RAM)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(4 << 20):
                h.update(block)
        after = FileStat.of(path)
    except FileNotFoundError:
        raise InputError(f"{path}: disappeared during ingest") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    if after != stat:
        raise InputError(f"{path}: changed while it was being read; run again when the "
                         f"dataset is no longer being written")
    return h.digest()


Decoded = dict[str, np.ndarray] | Iterable[dict[str, np.ndarray]]
STAT_BLOCK = 1024  # files stat'ed (and their path keys made) together


def _stat(path: bytes) -> os.stat_result:
    try:
        st = os.stat(path)
    except OSError:
        raise InputError(f"{os.fsdecode(path)}: disappeared during ingest") from None
    if not stat_module.S_ISREG(st.st_mode):
        FileStat.of(os.fsdecode(path))  # names the path and what it is
    return st


STAT_COLUMNS = ("key", "size", "mtime_ns", "ino")


def _stat_all(paths: PathList, index: Records | None = None) -> Records | None:
    """Path keys and stats of `paths` as records (digest and rows left empty), block by
    block so that no per-file Python object outlives its block. None when they are
    `index`'s files in its order, each with the size, mtime_ns and inode it records (a
    start after a run): compared block by block as they are made, so such a start holds
    no second copy of the records (~100 bytes a file) and no sort of the keys; the records
    are made only from the first block that differs, the index's copied up to it."""
    out, same = None, index is not None and len(index) == len(paths)
    for b in range(0, len(paths), STAT_BLOCK):
        rels = paths.block(b, min(b + STAT_BLOCK, len(paths)))
        stats = [_stat(paths.full(rel)) for rel in rels]
        end = b + len(rels)
        block = {"key": np.frombuffer(b"".join(map(path_key, rels)), "S16"),
                 "size": [s.st_size for s in stats],
                 "mtime_ns": [s.st_mtime_ns for s in stats], "ino": [s.st_ino for s in stats]}
        if same and all(np.array_equal(index.block(c, b, end), block[c]) for c in STAT_COLUMNS):
            continue
        if out is None:  # the first block that differs: the blocks before are the index's
            out = Records.empty(len(paths))
            for c in STAT_COLUMNS if b else ():
                getattr(out, c)[:b] = index.block(c, 0, b)
        same = False
        for c in STAT_COLUMNS:
            getattr(out, c)[b:end] = block[c]
    if same:
        return None
    return Records.empty(0) if out is None else out


def _reuse(index: Records, out: Records, at: np.ndarray) -> np.ndarray:
    """Which files' stats equal those of their record in `index` (`at`: the record of each
    file, or -1); the digest and rows of those are copied into `out`. Walked in blocks of
    the listing, the index's columns gathered where its matches lie (they follow the
    listing), not read whole."""
    same = at >= 0
    for a in range(0, len(at), READ_ROWS):
        part = slice(a, a + READ_ROWS)
        mine = a + np.flatnonzero(same[part])
        for column in ("size", "mtime_ns", "ino"):
            equal = index.gather(column, at[mine]) == getattr(out, column)[mine]
            same[mine[~equal]], mine = False, mine[equal]
        for column in ("digest", "start", "count", "check"):
            getattr(out, column)[mine] = index.gather(column, at[mine])
    return same


def update(cache: RowCache, root: Path, paths: PathList | list[str | Path],
           decode: Callable[[bytes | None, str], Decoded],
           verify: bool = False, whole_files: bool = True) -> tuple[Records, UpdateReport]:
    """Bring `cache` up to date with `paths` (files under `root`) and return each file's
    record, in the order given. Only files that are new or changed, by (size, mtime_ns,
    inode) or with `verify` by content, are read; only content the cache lacks is decoded.
    `decode(data, path)` gets the file's bytes (`whole_files`), or None and reads the path
    itself, and returns the rows as a dict of arrays (decoded in a worker) or as an
    iterable of such dicts (consumed batch by batch while appending).
    On an error the rows complete so far are committed before it is raised."""
    t0, report = time.perf_counter(), UpdateReport(files=len(paths))
    if not isinstance(paths, PathList):
        paths = PathList.of(str(root), map(str, paths))
    out = _stat_all(paths, None if verify else cache.index)
    if out is None:
        report.seconds = time.perf_counter() - t0
        return cache.index, report
    at = cache.lookup(out.key)
    known = int((at >= 0).sum())
    redo = ~_reuse(cache.index, out, at)  # the files to read: new or changed, or all
    if verify:
        redo[:] = True
    todo = int(redo.sum())

    global _JOB
    _JOB = (cache, paths, out, decode, whole_files)
    placed = _Placed(cache, out, at, verify, report)
    if todo:
        cache.sort_digests()  # once, not again in each worker
    try:
        pool = _workers(todo, int(np.sum(out.size, where=redo)), whole_files)
        try:
            for block in _blocks(redo):
                for i, digest, arrays in pool.map(_work, block, chunksize=16):
                    placed.place(i, digest, arrays)
                    if cache.due():
                        cache.commit(out, final=False, done=placed.done)
        finally:  # on an error, the queued files are not decoded for nothing
            pool.shutdown(cancel_futures=True)
        report.removed = len(cache.index) - known
        if todo or report.removed:
            cache.commit(out, final=True)
    except BaseException:
        try:  # what was decoded completely stays usable
            cache.commit(out, final=False, done=placed.done)
        except OSError:
            pass
        raise
    finally:
        _JOB = None
    report.seconds = time.perf_counter() - t0
    return out, report


def _blocks(redo: np.ndarray) -> Iterator[list[int]]:
    """The files `redo` marks, BLOCK at a time in listing order, found a stretch of the
    listing at a time (np.flatnonzero of a first ingest's mask would hold 8 bytes a file)."""
    held = np.zeros(0, np.int64)
    for a in range(0, len(redo), READ_ROWS):
        held = np.concatenate((held, a + np.flatnonzero(redo[a:a + READ_ROWS])))
        while len(held) >= BLOCK:
            yield held[:BLOCK].tolist()
            held = held[BLOCK:]
    if len(held):
        yield held.tolist()


# What the workers of one update need, set before they start (forked processes inherit
# it): the cache (its known digests and column layout), the paths and their stats, the
# decoder.
_JOB = None


def _stat_of(records: Records, i: int) -> FileStat:
    return FileStat(int(records.size[i]), int(records.mtime_ns[i]), int(records.ino[i]))


def _work(i: int):
    """Read, hash and (for content the cache lacks) decode one file, in a worker."""
    cache, paths, records, decode, whole_files = _JOB
    stat = _stat_of(records, i)
    data = _read(paths[i], stat) if whole_files else None
    digest = _hash_file(paths[i], stat) if data is None else hashlib.sha256(data).digest()
    if cache.find(digest) is not None:
        return i, digest, None
    return i, digest, _prepared(cache, decode(data, paths[i]))


FORK_BYTES = 1 << 20  # less to decode than this: one thread beats starting processes


def _workers(files: int, size: int, whole_files: bool):
    """Decoding many small files is mostly Python holding the GIL (pillow's per-image
    overhead; measured: threads on 2 cores ran slower than one), so files decoded whole
    go to forked processes, one per usable core, when there is enough to decode to pay
    for starting them (FORK_BYTES of encoded images). Tables are
    decoded batch by batch in this process (pyarrow reads in its own threads); their
    workers only hash."""
    cores = usable_cores()
    if whole_files and files >= 64 and size >= FORK_BYTES and cores > 1:
        return ProcessPoolExecutor(cores, mp_context=multiprocessing.get_context("fork"),
                                   initializer=die_with_parent)
    return ThreadPoolExecutor(cores if not whole_files else 1)


def _prepared(cache: RowCache, rows: Decoded):
    """Rows given as one dict are made ready for writing here, in the decoding thread."""
    return cache.prepare(rows) if isinstance(rows, dict) else rows


class _Appended:
    """The content appended during one update: digest -> the record of the file it came
    from. Kept as sorted numpy columns of the digests' first 8 bytes (16 bytes per file,
    where a dict costs ~140); the latest ones sit in a dict, merged in when it holds MERGE
    files or 1/32 of the columns, whichever is more: each merge copies the columns, so a
    fixed cadence would copy quadratically (5 s per million files), a growing one linearly
    (~4 bytes per file more in the dict)."""

    MERGE = 4096

    def __init__(self):
        self.prefix, self.row = np.zeros(0, np.uint64), np.zeros(0, np.int64)
        self.latest: dict[bytes, int] = {}
        self.limit = self.MERGE

    def add(self, digest: bytes, row: int) -> None:
        self.latest[digest] = row
        if len(self.latest) >= self.limit:
            new = np.frombuffer(b"".join(d[:8] for d in self.latest), np.uint64)
            rows = np.fromiter(self.latest.values(), np.int64)
            order = np.argsort(new, kind="stable")
            at = np.searchsorted(self.prefix, new[order])
            self.prefix = np.insert(self.prefix, at, new[order])
            self.row = np.insert(self.row, at, rows[order])
            self.latest, self.limit = {}, max(self.MERGE, len(self.prefix) >> 5)

    def get(self, digest: bytes, digests: np.ndarray) -> int | None:
        """The row of `digest`, whose whole digest `digests` (of every file) holds."""
        if digest in self.latest:
            return self.latest[digest]
        key = np.frombuffer(digest[:8], np.uint64)[0]
        for j in range(np.searchsorted(self.prefix, key), len(self.prefix)):
            if self.prefix[j] != key:
                break
            if digests[self.row[j]:self.row[j] + 1].tobytes() == digest:
                return int(self.row[j])
        return None


class _Placed:
    """Records the files of one update as their results come in: rows of content already
    cached are reused (the index's, or those appended earlier in this update), other
    content is appended."""

    def __init__(self, cache: RowCache, out: Records, at: np.ndarray, verify: bool,
                 report: UpdateReport):
        self.cache, self.out, self.at, self.verify, self.report = cache, out, at, verify, report
        self.done = np.zeros(len(out), bool)  # records of files placed (so far) that changed
        self.fresh = _Appended()

    def _appended(self, digest: bytes) -> tuple[int, int, bytes] | None:
        j = self.fresh.get(digest, self.out.digest)
        if j is None:
            return None
        return int(self.out.start[j]), int(self.out.count[j]), self.out.check[j:j + 1].tobytes()

    def place(self, i: int, digest: bytes, arrays: Decoded | None) -> None:
        cache, out, old = self.cache, self.out, int(self.at[i])
        if old < 0:
            self.report.new += 1
        elif cache.index.block("digest", old, old + 1).tobytes() != digest:
            self.report.changed += 1
        have = cache.find(digest)
        if have is not None and arrays is None and self.verify and not cache.check_rows(*have):
            cache.forget(digest)  # the cached rows were altered: decode the file again
            have = None
        have = have or self._appended(digest)
        if have is None:
            if arrays is None:  # the worker saw it cached; since found altered
                arrays = _prepared(cache, _decode_again(i))
            self.report.decoded += 1
            have = cache.append(arrays)
            self.fresh.add(digest, i)
        out.digest[i] = digest
        out.start[i], out.count[i], out.check[i] = have
        self.done[i] = True


def _decode_again(i: int) -> Decoded:
    _, paths, records, decode, whole_files = _JOB
    return decode(_read(paths[i], _stat_of(records, i)) if whole_files else None,
                  paths[i])
