"""The decoded-row cache of a fixed dataset: kept per source file, keyed by content.

One folder per (source root, decode settings):

    index.npz          one record per source file: path, size, mtime_ns, inode, SHA-256 of
                       its bytes, the rows it decoded to (start, count) and a CRC-32
                       check of those rows; with the settings
    <column>.<gen>.bin the decoded rows of every file, appended (raw, fixed row size)
    lock               held while an ingest runs (DDP ranks and parallel runs queue on it)

A file whose (size, mtime_ns, inode) match its record is not read again (as git and rsync
decide); `verify=True` re-hashes every file and re-checks every row. A file with content
already in the cache (renamed, moved to another class) reuses its rows. New rows are
appended and committed every ~64 MiB by rewriting the index atomically, so a killed
ingest keeps what it committed and the next run resumes from there; bytes past the last
commit are cut off when the cache is opened. Rows of files that were removed or changed
stay until they are more than half of the cache, then the live rows are copied into the
next generation of files.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import stat as stat_module
import sys
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.atomic import atomic_path
from export.errors import InputError
from trainer.data.rowfile import RowFile

FORMAT = 3  # 2: CRC-32 row checks; 3: index.npz
INDEX = "index.npz"
COMMIT_BYTES = 64 << 20  # rows decoded between two index commits
FIELDS = ("path", "size", "mtime_ns", "ino", "digest", "start", "count", "check")


@dataclass(frozen=True, slots=True)
class FileStat:
    size: int
    mtime_ns: int
    ino: int

    @classmethod
    def of(cls, path: str | Path) -> FileStat:
        """The stat of a regular file (a FIFO or device would be read forever)."""
        st = os.stat(path)
        if not stat_module.S_ISREG(st.st_mode):
            raise InputError(f"{path}: not a regular file (a pipe, device or socket); "
                             "expected an image or table file")
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass(frozen=True, slots=True)
class Entry:
    """What the cache knows of one source file."""

    path: str  # relative to the source root
    stat: FileStat
    digest: bytes  # SHA-256 of the file's bytes
    start: int  # first row in the column files
    count: int  # rows decoded from the file
    check: bytes  # of the decoded rows (CRC-32 per column, combined)


@dataclass(frozen=True)
class Prepared:
    """One file's decoded rows, contiguous, with their check (RowCache.prepare)."""

    arrays: dict[str, np.ndarray]
    count: int
    check: bytes


class _Check:
    """CRC-32 of a column's rows, fed piece by piece: it catches a cache file truncated or
    edited by hand, not an adversary (the source files' SHA-256 does that), and runs at
    ~2 GB/s where BLAKE2b ran at ~0.5 GB/s and was half of a table's ingest."""

    def __init__(self):
        self.crc = 0

    def update(self, data) -> None:
        self.crc = zlib.crc32(data, self.crc)

    def digest(self) -> bytes:
        return self.crc.to_bytes(4, "big")


def _combine(checks: dict) -> bytes:
    """One 8-byte check of a file's rows from its per-column checks."""
    return hashlib.blake2b(b"".join(checks[n].digest() for n in sorted(checks)),
                           digest_size=8).digest()


def cache_root(cache_dir: str | None) -> Path:
    return Path(cache_dir or os.environ.get("FROZENFIT_CACHE",
                                            Path.home() / ".cache" / "frozenfit"))


class RowCache:
    """Open with `RowCache.open(folder, columns, settings)` (a context manager that holds
    the lock). `columns` maps a column name to (row shape, dtype)."""

    def __init__(self, folder: Path, columns: dict[str, tuple[tuple[int, ...], str]],
                 settings: dict):
        self.folder, self.settings = folder, settings
        self.columns = {k: (tuple(s), np.dtype(d)) for k, (s, d) in columns.items()}
        self.entries: dict[str, Entry] = {}
        self.by_digest: dict[bytes, Entry] = {}
        self.gen, self.rows, self.extra = 0, 0, {}
        self._since_commit = 0
        self._files: dict = {}
        self._maps: dict[str, np.ndarray] | None = None  # check_rows' memory maps

    @classmethod
    @contextmanager
    def open(cls, folder: Path, columns: dict, settings: dict) -> Iterator[RowCache]:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                cache = cls(folder, columns, settings)
                cache._load()
                yield cache
            finally:
                cache._close()
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def _file(self, name: str):
        """The column file, open at its last row for appending (for the whole ingest)."""
        if name not in self._files:
            f = open(self._bin(name), "r+b", buffering=1 << 20)
            f.seek(self.rows * self._row_bytes(name))
            self._files[name] = f
        return self._files[name]

    # ---------------------------------------------------------------- reading
    def _row_bytes(self, name: str) -> int:
        shape, dtype = self.columns[name]
        return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize

    def _bin(self, name: str, gen: int | None = None) -> Path:
        return self.folder / f"{name}.{self.gen if gen is None else gen}.bin"

    def _load(self) -> None:
        index = self.folder / INDEX
        want = {"format": FORMAT, "columns": {k: [list(s), d.str] for k, (s, d) in
                                              self.columns.items()}, "settings": self.settings}
        cols = None
        if index.is_file():
            try:
                with np.load(index, allow_pickle=False) as npz:
                    cols = {k: npz[k] for k in (*FIELDS, "meta")}
                meta = json.loads(cols["meta"].tobytes())
                paths = cols["path"].tobytes().decode("utf-8", "surrogateescape").split("\0")
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
                print(f"cache: {index}: unreadable ({type(exc).__name__}); rebuilding it",
                      file=sys.stderr)
                cols = None
        if cols is not None and {k: meta.get(k) for k in want} == want:
            self.gen, self.extra = int(meta["gen"]), meta.get("extra", {})
            numbers = zip(*(cols[k].tolist() for k in ("size", "mtime_ns", "ino", "start",
                                                         "count")))
            digests, checks = cols["digest"].tobytes(), cols["check"].tobytes()
            for i, (path, (size, mtime, ino, start, count)) in enumerate(zip(paths, numbers)):
                self.entries[path] = Entry(path, FileStat(size, mtime, ino),
                                           digests[32 * i:32 * i + 32], start, count,
                                           checks[8 * i:8 * i + 8])
        self._truncate_to_entries()
        for stale in self.folder.glob("*.bin"):  # other generations, interrupted compactions
            if stale not in {self._bin(n) for n in self.columns}:
                stale.unlink()

    def _truncate_to_entries(self) -> None:
        """Drop records whose rows a column file no longer holds (a truncated file), and
        cut bytes past the last committed row (a killed ingest)."""
        have = min((self._bin(n).stat().st_size // self._row_bytes(n)
                    if self._bin(n).is_file() else 0) for n in self.columns)
        lost = [e for e in self.entries.values() if e.start + e.count > have]
        if lost:
            print(f"cache: {self._bin(next(iter(self.columns)))}: holds {have} rows, the index "
                  f"needs more; decoding {len(lost)} files again", file=sys.stderr)
            for e in lost:
                del self.entries[e.path]
        self.rows = max((e.start + e.count for e in self.entries.values()), default=0)
        for name in self.columns:
            with open(self._bin(name), "ab") as f:
                f.truncate(self.rows * self._row_bytes(name))
        self.by_digest = {e.digest: e for e in self.entries.values()}

    def known(self, path: str, stat: FileStat) -> Entry | None:
        """The record of `path` if the file is unchanged by (size, mtime_ns, inode)."""
        e = self.entries.get(path)
        return e if e is not None and e.stat == stat else None

    def arrays(self) -> dict[str, RowFile]:
        """Every column's committed rows, read on demand."""
        for f in self._files.values():
            f.flush()
        return {name: RowFile(self._bin(name), dtype, shape, self.rows)
                for name, (shape, dtype) in self.columns.items()}

    def check_rows(self, e: Entry) -> bool:
        """Whether the cached rows of `e` are still what was decoded."""
        if self._maps is None or len(next(iter(self._maps.values()))) < e.start + e.count:
            self._maps = self.arrays()
        checks = {n: _Check() for n in self.columns}
        for name, check in checks.items():
            step = max(1, (32 << 20) // self._row_bytes(name))
            for a in range(e.start, e.start + e.count, step):
                rows = self._maps[name][a:min(a + step, e.start + e.count)]
                check.update(memoryview(np.ascontiguousarray(rows)).cast("B"))
        return _combine(checks) == e.check

    # ---------------------------------------------------------------- writing
    def prepare(self, arrays: dict[str, np.ndarray]) -> Prepared:
        """One file's decoded rows made contiguous and checked: the part of appending that
        can run in a decoding worker."""
        count = len(next(iter(arrays.values())))
        checks = {n: _Check() for n in self.columns}
        out = {}
        for name, (shape, dtype) in self.columns.items():
            out[name] = np.ascontiguousarray(arrays[name], dtype=dtype).reshape(count, *shape)
            checks[name].update(memoryview(out[name]).cast("B"))
        return Prepared(out, count, _combine(checks))

    def append(self, path: str, stat: FileStat, digest: bytes,
               rows: Prepared | Iterable[dict[str, np.ndarray]]) -> Entry:
        """Append the decoded rows of one file, prepared or as batches of column arrays
        (uncommitted until `commit`)."""
        start = self.rows
        if isinstance(rows, Prepared):
            self._write(rows)
            check = rows.check
        else:
            checks = {n: _Check() for n in self.columns}
            for arrays in rows:
                batch = self.prepare(arrays)
                self._write(batch)
                for name, arr in batch.arrays.items():
                    checks[name].update(memoryview(arr).cast("B"))
            check = _combine(checks)
        e = Entry(path, stat, digest, start, self.rows - start, check)
        self.record(e)
        return e

    def _write(self, rows: Prepared) -> None:
        for name, arr in rows.arrays.items():
            self._file(name).write(memoryview(arr).cast("B"))
            self._since_commit += arr.nbytes
        self.rows += rows.count

    def forget(self, digest: bytes) -> None:
        """Stop reusing the rows of `digest` (they were found altered)."""
        self.by_digest.pop(digest, None)

    def record(self, e: Entry) -> None:
        self.entries[e.path] = e
        self.by_digest[e.digest] = e

    def maybe_commit(self) -> None:
        if self._since_commit >= COMMIT_BYTES:
            self.commit()

    def commit(self, keep: set[str] | None = None) -> None:
        """Make the rows appended so far durable and the index point at them; `keep`, when
        given, is the set of paths still in the source (the others are forgotten)."""
        if keep is not None:
            self.entries = {p: e for p, e in self.entries.items() if p in keep}
            self.by_digest = {e.digest: e for e in self.entries.values()}
            live = sum(e.count for e in {e.digest: e for e in self.entries.values()}.values())
            if self.rows > 1024 and live < self.rows // 2:
                self._compact()
        for name in self.columns:
            f = self._file(name)
            f.flush()
            os.fsync(f.fileno())
        self._write_index()
        self._since_commit = 0

    def _write_index(self) -> None:
        """The index as an uncompressed .npz of columns (paths NUL-separated: a file name
        cannot hold NUL). Not Arrow: pyarrow imports pandas (0.7 s) on its first array."""
        es = list(self.entries.values())
        meta = {"format": FORMAT, "gen": self.gen, "settings": self.settings,
                "columns": {k: [list(s), d.str] for k, (s, d) in self.columns.items()},
                "extra": self.extra}
        paths = "\0".join(e.path for e in es).encode("utf-8", "surrogateescape")
        cols = {
            "path": np.frombuffer(paths, np.uint8),
            "size": np.array([e.stat.size for e in es], np.int64),
            "mtime_ns": np.array([e.stat.mtime_ns for e in es], np.int64),
            "ino": np.array([e.stat.ino for e in es], np.uint64),
            # raw bytes, not numpy "S" strings: those drop trailing NUL bytes of a digest
            "digest": np.frombuffer(b"".join(e.digest for e in es), np.uint8),
            "start": np.array([e.start for e in es], np.int64),
            "count": np.array([e.count for e in es], np.int64),
            "check": np.frombuffer(b"".join(e.check for e in es), np.uint8),
            "meta": np.frombuffer(json.dumps(meta).encode(), np.uint8),
        }
        with atomic_path(self.folder / INDEX) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **cols)
                f.flush()
                os.fsync(f.fileno())

    def _compact(self) -> None:
        """Copy the live rows into the next generation of column files (in file order)."""
        old = self.arrays()
        self._close()
        self._maps = None
        gen, start, moved = self.gen + 1, 0, {}
        outs = {name: open(self._bin(name, gen), "wb") for name in self.columns}
        try:
            for e in sorted({e.digest: e for e in self.entries.values()}.values(),
                            key=lambda e: e.start):
                for name, f in outs.items():
                    f.write(memoryview(np.ascontiguousarray(old[name][e.start:e.start + e.count]))
                            .cast("B"))
                moved[e.digest] = start
                start += e.count
            for f in outs.values():
                f.flush()
                os.fsync(f.fileno())
        finally:
            for f in outs.values():
                f.close()
        del old
        self.entries = {p: Entry(e.path, e.stat, e.digest, moved[e.digest], e.count, e.check)
                        for p, e in self.entries.items()}
        self.by_digest = {e.digest: e for e in self.entries.values()}
        self.gen, self.rows = gen, start
        self._write_index()  # the switch to the new generation
        for name in self.columns:
            self._bin(name, gen - 1).unlink(missing_ok=True)
