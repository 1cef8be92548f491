"""Bringing a dataset's row cache up to date with its files: only what is new or changed is
read, only content the cache lacks is decoded (in worker processes for images), block by
block so memory holds one block of decoded rows."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.errors import InputError
from trainer.allocator import release_free_memory
from trainer.data.cache import FileStat, Records, RowCache
from trainer.data.filestat import STAT_COLUMNS, Stats, missing_file, smudged, stat_piece
from trainer.data.paths import PathList
from trainer.data.appended import Appended
from trainer.data.records import READ_ROWS, Head, Spill
from trainer.data.scan import died, fork_pool, worth_forking
from trainer.data.workers import Pool, hand, take

BLOCK = 512  # files read, hashed and decoded together by the thread pool
TRIM_BYTES = 16 << 20  # rows appended between two trims of the heap (a few ms each)


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


def _read(path: str, stat: FileStat, keep: bool, head: bytes = b"") -> tuple[bytes | None, bytes]:
    """The file's bytes (with `keep`: read whole) and the SHA-256 of `head` and them;
    without `keep` it is read in 4 MiB pieces (a table file may be larger than RAM). The
    file must still be as `stat` says after it was read."""
    h, data, size = hashlib.sha256(head), b"" if keep else None, 0
    try:
        with open(path, "rb") as f:
            while block := f.read(stat.size + 1 if keep else 4 << 20):
                h.update(block)
                data, size = block if keep else None, size + len(block)
        after = FileStat.of(path)
    except FileNotFoundError:
        raise missing_file(path) from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    if size != stat.size or after != stat:
        raise InputError(f"{path}: changed while it was being read; run again when the "
                         "dataset is no longer being written")
    return data, h.digest()


Decoded = dict[str, np.ndarray] | Iterable[dict[str, np.ndarray]]
STAT_BLOCK = 1024  # files stat'ed (and their path keys made) together


def _stat_forked(a: int, e: int) -> Stats:
    return stat_piece(_JOB[1], a, e)  # the listing of the update that forked this worker


class _Stats:
    """The listing's stats, STAT_BLOCK files at a time: in forked processes when there are
    enough files to pay for them (most of an update that finds nothing changed), else here."""

    def __init__(self, paths: PathList):
        workers = worth_forking(len(paths), -(-len(paths) // STAT_BLOCK))
        self.paths, self.pool = paths, fork_pool(workers) if workers else None

    def submit(self, a: int, e: int) -> Iterable[Stats]:
        """The pieces of files a..e-1: stat'ed by the workers from now on, or here as they
        are taken (one piece held at a time; such a listing is one block, with no block
        before it to overlap)."""
        spans = [(b, min(b + STAT_BLOCK, e)) for b in range(a, e, STAT_BLOCK)]
        if self.pool is None:
            return (stat_piece(self.paths, *span) for span in spans)
        return self.pool.map(_stat_forked, *zip(*spans), chunksize=4)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def _stat_block(pieces: Iterable[Stats], a: int, e: int, cache: RowCache, verify: bool,
                shift: int) -> tuple[Records | None, np.ndarray | None, int]:
    """Records of files a..e-1 from their `pieces` of stats (digest and rows empty), the
    index's record of each (or -1) and the shift after them; (None, None, shift) when they
    are the index's records a-shift..e-shift-1 with the sizes, mtime_ns and inodes recorded.
    `shift` (files added less files removed before them) lets the files after one added or
    removed match the index a piece at a time without a lookup; a piece whose paths differ
    is looked up, and its last file found sets the shift after it."""
    index, out, at = cache.index, None, None
    for b, piece in zip(range(a, e, STAT_BLOCK), pieces):
        end = b + len(piece[0])
        p, q = b - shift, end - shift  # where these files' records lie in the index
        block = dict(zip(STAT_COLUMNS, piece))
        # the same paths in place (changed files among them, or racily clean records: their
        # stats differ) need no lookup by key; the same stats too: the index's records
        placed = 0 <= p and q <= len(index) and np.array_equal(index.block("key", p, q),
                                                                block["key"])
        same = not verify and placed and all(
            np.array_equal(index.block(c, p, q), block[c]) for c in STAT_COLUMNS[1:])
        if same and out is None:
            continue
        if out is None:  # the first piece that differs: those before are the index's
            out, at = Records.empty(e - a), np.arange(a - shift, e - shift)
            for c in STAT_COLUMNS if b > a else ():
                getattr(out, c)[:b - a] = index.block(c, a - shift, p)
        for c in STAT_COLUMNS:
            getattr(out, c)[b - a:end - a] = block[c]
        if placed:
            at[b - a:end - a] = np.arange(p, q)
        else:
            found = at[b - a:end - a] = cache.lookup(block["key"], keep=True)
            if found[-1] >= 0:
                shift = end - 1 - int(found[-1])
    return out, at, shift


def _reuse(index: Records, out: Records, at: np.ndarray) -> np.ndarray:
    """Which files' stats equal those of their record in `index` (`at`: the record of each
    file, or -1); the digest and rows of those are copied into `out`. The index's columns
    are gathered where the matches lie (they follow the listing), not read whole."""
    same = at >= 0
    mine = np.flatnonzero(same)
    for column in ("size", "mtime_ns", "ino"):
        equal = index.gather(column, at[mine]) == getattr(out, column)[mine]
        same[mine[~equal]], mine = False, mine[equal]
    for column in ("digest", "start", "count", "check"):
        getattr(out, column)[mine] = index.gather(column, at[mine])
    return same


def update(cache: RowCache, root: Path, paths: PathList | list[str | Path],
           decode: Callable[[bytes | None, str], Decoded], verify: bool = False,
           whole_files: bool = True, path_values: Callable[[str], bytes] | None = None,
           ) -> tuple[Records, UpdateReport]:
    """Bring `cache` up to date with `paths` (files under `root`) and return each file's
    record, in the order given. Only files that are new or changed, by (size, mtime_ns,
    inode) or with `verify` by content, are read; only content the cache lacks is decoded.
    `decode(data, path)` gets the file's bytes (`whole_files`), or None and reads the path
    itself, and returns the rows as a dict of arrays (decoded in a worker) or as an
    iterable of such dicts (consumed batch by batch while appending). `path_values(path)`:
    what a file's path puts in its rows (a hive partition's key values), hashed with its
    bytes: the same bytes under another partition are other rows.
    The listing is walked READ_ROWS files at a time: each block is stat'ed, matched with
    the index, its new and changed files decoded, and its records written to a spill file,
    so memory holds one block of records. On an error the rows complete so far are
    committed before it is raised."""
    t0, report = time.perf_counter(), UpdateReport(files=len(paths))
    if not isinstance(paths, PathList):
        paths = PathList.of(str(root), map(str, paths))
    global _JOB
    _JOB = (cache, paths, decode, whole_files, path_values or (lambda _: b""))
    paths.flush()  # the listing on disk before a worker is forked
    run, stats = _Run(cache, paths, verify, whole_files, report), _Stats(paths)
    try:
        for a in range(0, len(paths), READ_ROWS):
            e = min(a + READ_ROWS, len(paths))
            pieces = stats.submit(a, e)
            run.complete()  # the block before, whose first files were decoded meanwhile
            out, at, run.shift = _stat_block(pieces, a, e, cache, verify, run.shift)
            run.start(a, e, out, at)
        run.complete()
        run.finish()
    except BaseException as exc:
        try:  # what was decoded completely stays usable
            run.save()
        except OSError:
            pass
        if isinstance(exc, BrokenProcessPool):
            raise died(root) from None
        raise
    finally:
        stats.close()
        run.close()
        _JOB = None
    report.seconds = time.perf_counter() - t0
    return cache.index, report


# What the workers of one update need, set before they start (forked processes inherit
# it): the cache (its known digests and column layout), the paths, the decoder.
_JOB = None


def _work(task: tuple[int, str, int, int, int, int]):
    """Read, hash and (for content the cache lacks) decode one file, in a worker; `task`
    is the file's place in the listing, its path, its stat and its slot in the slab."""
    cache, _, decode, whole_files, path_values = _JOB
    i, path, stat = task[0], task[1], FileStat(*task[2:5])
    data, digest = _read(path, stat, whole_files, path_values(path))
    if cache.find(digest) is not None:
        return i, digest, None
    return i, digest, hand(task[5], _prepared(cache, decode(data, path)))


def _prepared(cache: RowCache, rows: Decoded):
    """Rows given as one dict are made ready for writing here, in the decoding thread."""
    return cache.prepare(rows) if isinstance(rows, dict) else rows


class _Run:
    """One update, a block of the listing at a time. The listing's first `head` files are
    the index's own records in place; the records of every block after them go to a spill
    file as each block is completed. Within a block, the rows of content already cached are
    reused (the index's, or those appended earlier in this update), other content appended."""

    def __init__(self, cache: RowCache, paths: PathList, verify: bool, whole_files: bool,
                 report: UpdateReport):
        self.cache, self.paths, self.verify, self.report = cache, paths, verify, report
        self.head, self.known, self.spill, self.shift = 0, 0, None, 0
        self.fresh = Appended(report.files, cache.folder)
        self.row_bytes = sum(map(cache.row_bytes, cache.columns))
        self.pool, self.untrimmed = Pool(whole_files, self.row_bytes, 2 * BLOCK), 0
        # the block being completed: its first file, its records, the index's record of
        # each of its files (or -1), which of them were placed, which to read, the results
        # of the first BLOCK of those (decoded while the next block is stat'ed)
        self.a, self.out, self.at, self.done, self.redo, self.first = 0, None, None, None, None, ()
        self.sent = 0  # tasks submitted: each one's slot in the slab
        self.since = time.time_ns()  # before any file is stat'ed: what is racy is after it

    def start(self, a: int, e: int, out: Records | None, at: np.ndarray | None) -> None:
        """Start on files a..e-1, whose new records are `out` (None: the index's own, and
        they are complete) and whose records in the index are `at` (or -1)."""
        cache = self.cache
        if out is None:
            self.known += e - a
            if self.spill is None:
                self.head = e
            else:
                self.spill.append(cache.index, a - self.shift, e - self.shift)
            return
        self.at = at
        self.known += int((self.at >= 0).sum())
        redo = np.flatnonzero(np.ones(len(out), bool) if self.verify
                              else ~_reuse(cache.index, out, self.at))
        self.a, self.out, self.done, self.redo = a, out, np.zeros(len(out), bool), redo
        self.first = self._submit(redo[:BLOCK])

    def _submit(self, part: np.ndarray):
        """Hand files `part` of the block to the workers; their results, in order."""
        out, cache = self.out, self.cache
        if not len(part):
            return ()
        if self.pool.pool is None:
            cache.sort_digests()  # once, before any worker is forked
        pool = self.pool.get(len(part), int(out.size[part].sum()), len(self.redo))
        slots = range(self.sent, self.sent + len(part))
        self.sent += len(part)
        places = (self.a + part).tolist()
        tasks = zip(places, self.paths.at(places), out.size[part].tolist(),
                    out.mtime_ns[part].tolist(), out.ino[part].tolist(), slots)
        return pool.map(_work, tasks, chunksize=16)  # submitted now, read in order later

    def complete(self) -> None:
        """Place the decoded files of the block started last, BLOCK at a time, and spill
        its records."""
        if self.out is None:
            return
        results = self.first
        for b in range(BLOCK, len(self.redo) + BLOCK, BLOCK):
            for i, digest, arrays in results:
                self.place(i, digest, arrays)
                if self.cache.due():
                    self.save()
            results = self._submit(self.redo[b:b + BLOCK])
        if self.spill is None:
            self.spill = Spill(self.cache.folder)
        self.spill.append(smudged(self.out, self.since), 0, len(self.out))
        self.out, self.first = None, ()
        release_free_memory()  # the block's freed records and batches: not resident

    def _record(self, j: int, column: str) -> np.ndarray:
        """Column `column` of file j's record (one value), from the block or the spill."""
        if j >= self.a:
            return getattr(self.out, column)[j - self.a:j - self.a + 1]
        return self.spill.block(column, j - self.head, j - self.head + 1)

    def _appended(self, digest: bytes) -> tuple[int, int, bytes] | None:
        j = self.fresh.get(digest, lambda j: self._record(j, "digest").tobytes())
        if j is None:
            return None
        return (int(self._record(j, "start")[0]), int(self._record(j, "count")[0]),
                self._record(j, "check").tobytes())

    def place(self, i: int, digest: bytes, arrays: Decoded | None) -> None:
        cache, out, k = self.cache, self.out, i - self.a
        arrays = take(arrays)  # (rows a forked worker handed through shared memory)
        old = int(self.at[k])
        if old < 0:
            self.report.new += 1
        elif cache.index.block("digest", old, old + 1).tobytes() != digest:
            self.report.changed += 1
        # content a worker decoded was absent from the index when it looked (an update
        # only ever forgets digests there): not searched again, a pread a file saved
        have = cache.find(digest) if arrays is None else None
        if have is not None and self.verify and not cache.check_rows(*have):
            cache.forget(digest)  # the cached rows were altered: decode the file again
            have = None
        have = have or self._appended(digest)
        if have is None:
            if arrays is None:  # the worker saw it cached; since found altered
                arrays = _prepared(cache, _decode_again(i, out, k))
            self.report.decoded += 1
            have = cache.append(arrays)
            self.fresh.add(digest, i)
            self.untrimmed += have[1] * self.row_bytes
            if self.untrimmed >= TRIM_BYTES:  # the freed batches of files decoded on other
                release_free_memory()  # threads: glibc keeps them in those threads' heaps
                self.untrimmed = 0
        elif hasattr(arrays, "close"):  # decoded ahead (ahead.py) for content found cached
            arrays.close()
        out.digest[k] = digest
        out.start[k], out.count[k], out.check[k] = have
        self.done[k] = True

    def _parts(self) -> list:
        return ([(Head(self.cache.index, self.head), None)] if self.head else []) + \
            ([(self.spill, None)] if self.spill is not None else [])

    def save(self) -> None:
        """Commit the rows appended so far with the records completed so far."""
        parts = [(self.spill, None)] if self.spill is not None else []
        if self.out is not None:
            parts.append((smudged(self.out, self.since), self.done))
        self.cache.commit(parts, final=False)

    def finish(self) -> None:
        """The new index, when anything differs from the one stored."""
        self.report.removed = len(self.cache.index) - self.known
        if self.spill is not None or self.head != len(self.cache.index):
            self.cache.commit(self._parts(), final=True)

    def close(self) -> None:
        self.pool.close()
        if self.spill is not None:
            self.spill.close()


def _decode_again(i: int, out: Records, k: int) -> Decoded:
    _, paths, decode, whole_files, _ = _JOB
    stat = FileStat(int(out.size[k]), int(out.mtime_ns[k]), int(out.ino[k]))
    return decode(_read(paths[i], stat, whole_files)[0], paths[i])
