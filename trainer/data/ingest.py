"""Bringing a dataset's row cache up to date with its files: only what is new or changed is
read, only content the cache lacks is decoded (in worker processes for images), block by
block so memory holds one block of decoded rows."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.errors import InputError
from export.timing import usable_cores
from trainer.data.cache import Entry, FileStat, RowCache

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


def update(cache: RowCache, root: Path, paths: list[str | Path],
           decode: Callable[[bytes | None, Path], Decoded],
           verify: bool = False, whole_files: bool = True) -> tuple[list[Entry], UpdateReport]:
    """Bring `cache` up to date with `paths` (files under `root`) and return each file's
    record, in the order given. Only files that are new or changed, by (size, mtime_ns,
    inode) or with `verify` by content, are read; only content the cache lacks is decoded.
    `decode(data, path)` gets the file's bytes (`whole_files`), or None and reads the path
    itself, and returns the rows as a dict of arrays (decoded in a worker) or as an
    iterable of such dicts (consumed batch by batch while appending).
    On an error the rows complete so far are committed before it is raised."""
    t0, report = time.perf_counter(), UpdateReport(files=len(paths))
    paths = [str(p) for p in paths]
    prefix = os.path.join(str(root), "")
    if not all(p.startswith(prefix) for p in paths):
        raise ValueError(f"every path must lie under {root}")
    rels = [p[len(prefix):].replace(os.sep, "/") for p in paths]
    out: list[Entry | None] = [None] * len(paths)
    todo = []
    for i, (path, rel) in enumerate(zip(paths, rels)):
        try:
            stat = FileStat.of(path)
        except OSError:
            raise InputError(f"{path}: disappeared during ingest") from None
        known = cache.known(rel, stat)
        if known is not None and not verify:
            out[i] = known
        else:
            todo.append((i, stat))

    global _JOB
    _JOB = (cache, paths, decode, whole_files)
    try:
        pool = _workers(len(todo), whole_files)
        try:
            for b in range(0, len(todo), BLOCK):
                for i, stat, digest, arrays in pool.map(_work, todo[b:b + BLOCK], chunksize=16):
                    if arrays is None and verify and not cache.check_rows(cache.by_digest[digest]):
                        arrays = _prepared(cache, decode(_read(paths[i], stat) if whole_files
                                                         else None, Path(paths[i])))  # altered
                        cache.forget(digest)
                    out[i] = _place(cache, rels[i], stat, digest, arrays, report)
                    cache.maybe_commit()
        finally:  # on an error, the queued files are not decoded for nothing
            pool.shutdown(cancel_futures=True)
        keep = set(rels)
        report.removed = sum(1 for p in cache.entries if p not in keep)
        if todo or report.removed:
            cache.commit(keep)
    except BaseException:
        try:
            cache.commit()  # what was decoded completely stays usable
        except OSError:
            pass
        raise
    finally:
        _JOB = None
    report.seconds = time.perf_counter() - t0
    return out, report


# What the workers of one update need, set before they start (forked processes inherit
# it): the cache (its known digests and column layout), the paths, the decoder.
_JOB = None


def _work(item: tuple[int, FileStat]):
    """Read, hash and (for content the cache lacks) decode one file, in a worker."""
    cache, paths, decode, whole_files = _JOB
    i, stat = item
    data = _read(paths[i], stat) if whole_files else None
    digest = _hash_file(paths[i], stat) if data is None else hashlib.sha256(data).digest()
    if digest in cache.by_digest:
        return i, stat, digest, None
    return i, stat, digest, _prepared(cache, decode(data, Path(paths[i])))


def _die_with_parent() -> None:
    """A worker ends when the ingest that started it is killed (Linux): orphans would wait
    for work forever, holding the killed command's output pipes open."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the ingest's to handle
        if os.getppid() == 1:  # the parent died before the call
            os._exit(1)


def _workers(files: int, whole_files: bool):
    """Decoding many small files is mostly Python holding the GIL (pillow's per-image
    overhead; measured: threads on 2 cores ran slower than one), so files decoded whole
    go to forked processes, one per usable core. Tables are decoded batch by batch in
    this process (pyarrow reads in its own threads); their workers only hash."""
    cores = usable_cores()
    if whole_files and files >= 64 and cores > 1:
        return ProcessPoolExecutor(cores, mp_context=multiprocessing.get_context("fork"),
                                   initializer=_die_with_parent)
    return ThreadPoolExecutor(cores if not whole_files else 1)


def _prepared(cache: RowCache, rows: Decoded):
    """Rows given as one dict are made ready for writing here, in the decoding thread."""
    return cache.prepare(rows) if isinstance(rows, dict) else rows


def _place(cache: RowCache, rel: str, stat: FileStat, digest: bytes,
           arrays: Decoded | None, report: UpdateReport) -> Entry:
    """Record one read file: reuse rows of known content, else append its decoded rows."""
    old = cache.entries.get(rel)
    if old is None:
        report.new += 1
    elif old.digest != digest:
        report.changed += 1
    have = cache.by_digest.get(digest)
    if have is not None:
        entry = Entry(rel, stat, digest, have.start, have.count, have.check)
        cache.record(entry)
        return entry
    report.decoded += 1
    return cache.append(rel, stat, digest, arrays)
