"""The decoded-row cache of a fixed dataset: kept per source file, keyed by content.

One folder per (source root, decode settings):

    index.npz          one record per source file, as columns: a key of its path, size,
                       mtime_ns, inode, SHA-256 of its bytes, the rows it decoded to (start,
                       count) and a CRC-32 check of those rows; with the settings
    <column>.<gen>.bin the decoded rows of every file, appended (raw, fixed row size)
    lock               held while an ingest runs (DDP ranks and parallel runs queue on it)

A file whose (size, mtime_ns, inode) match its record is not read again (as git and rsync
decide; unless racily clean: filestat.py); `verify=True` re-hashes and re-checks all. A
file with content already in the cache (renamed, moved to another class) reuses its rows.
New rows are appended and committed every ~64 MiB by rewriting the index atomically, so
a killed ingest keeps what it committed and the next run resumes from there; bytes past
the last commit are cut off when the cache is opened. Rows of files that were removed or
changed stay until they are more than half of the cache, then the live rows are copied
into the next generation of files.

The records (trainer/data/records.py) are numpy columns, never a Python object per file,
read from the index where they lie (pread) when first used, written block by block (an
update's from its spill file); a listing is matched with the index by a sort and a search.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat as stat_module
import sys
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.atomic import atomic_path
from export.errors import InputError
from export.records import load_json
from export.timing import cache_folder
from trainer.data.prefixfile import PrefixFile
from trainer.data.records import (READ_ROWS, Records, Rows, StoredIndex,
                                  StoredRecords, joined, live_rows, places, prefix4, write_npy)
from trainer.data.rowcheck import Prepared, RowChecks
from trainer.data.rowfile import ColumnWriter, RowFile

FORMAT = 4  # 2: CRC-32 row checks; 3: index.npz; 4: path keys, records as columns
INDEX = "index.npz"
COMMIT_BYTES = 64 << 20  # rows decoded between two index commits


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


def _count(arrays: dict[str, np.ndarray]) -> int:
    return len(next(iter(arrays.values())))


def cache_root(cache_dir: str | None) -> Path:
    return Path(cache_dir) if cache_dir else cache_folder()


class RowCache:
    """Open with `RowCache.open(folder, columns, settings)` (a context manager that holds
    the lock). `columns` maps a column name to (row shape, dtype)."""

    def __init__(self, folder: Path, columns: dict[str, tuple[tuple[int, ...], str]],
                 settings: dict):
        self.folder, self.settings = folder, settings
        self.columns = {k: (tuple(s), np.dtype(d)) for k, (s, d) in columns.items()}
        self.index = Records.empty()  # as committed (one record per key)
        self.gen, self.rows, self.extra = 0, 0, {}
        self._since_commit = 0
        self._out: ColumnWriter | None = None  # the column files, open for appending
        self._maps: dict[str, RowFile] | None = None  # check_rows' readers
        self._sorted: dict = {}  # index.key (in memory), index.digest (PrefixFile), sorted
        self._forgotten: set[bytes] = set()

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
        out, self._out = self._out, None
        if out is not None:
            out.close()

    def _writer(self) -> ColumnWriter:
        """The column files, open at their last row for appending (for the whole ingest)."""
        if self._out is None:
            self._out = ColumnWriter({n: self._bin(n) for n in self.columns},
                                     {n: self.rows * self.row_bytes(n) for n in self.columns})
        return self._out

    # ---------------------------------------------------------------- reading
    def row_bytes(self, name: str) -> int:
        shape, dtype = self.columns[name]
        return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize

    def _bin(self, name: str, gen: int | None = None) -> Path:
        return self.folder / f"{name}.{self.gen if gen is None else gen}.bin"

    def _meta(self) -> dict:
        return {"format": FORMAT, "settings": self.settings,
                "columns": {k: [list(s), d.str] for k, (s, d) in self.columns.items()}}

    def _load(self) -> None:
        index, meta, records = self.folder / INDEX, None, None
        if index.is_file():
            try:
                stored = StoredIndex(index)
                meta = load_json(stored.read("meta").tobytes())
                if {k: meta.get(k) for k in self._meta()} == self._meta():
                    gen, extra = int(meta["gen"]), meta.get("extra", {})
                    if not isinstance(extra, dict):
                        raise TypeError("extra")
                    records = StoredRecords(stored)
            except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError,
                    zipfile.BadZipFile) as exc:
                print(f"cache: {index}: unreadable ({type(exc).__name__}); rebuilding it",
                      file=sys.stderr)
        if records is not None:
            self.gen, self.extra = gen, extra
            if not meta.get("unique"):
                # a commit during an ingest appends records: the last one of a key holds
                _, last = np.unique(records.key[::-1], return_index=True)
                records = records.take(np.sort(len(records) - 1 - last))
            self.index = records
        self._truncate_to_index()
        for stale in self.folder.glob("*.bin"):  # other generations, interrupted compactions
            if stale not in {self._bin(n) for n in self.columns}:
                stale.unlink()

    def _truncate_to_index(self) -> None:
        """Drop records whose rows a column file no longer holds (a truncated file), and
        cut bytes past the last committed row (a killed ingest)."""
        have = min((self._bin(n).stat().st_size // self.row_bytes(n)
                    if self._bin(n).is_file() else 0) for n in self.columns)
        self.rows = self.index.extent()
        if self.rows > have:
            lost = self.index.start + self.index.count > have
            print(f"cache: {self._bin(next(iter(self.columns)))}: holds {have} rows, the index "
                  f"needs more; decoding {int(lost.sum())} files again", file=sys.stderr)
            self._set_index(self.index.take(~lost))
            self.rows = self.index.extent()
        for name in self.columns:
            with open(self._bin(name), "ab") as f:
                f.truncate(self.rows * self.row_bytes(name))

    def _set_index(self, records: Records) -> None:
        self.index, self._sorted = records, {}

    def _sorted_column(self, column: str) -> tuple[np.ndarray, np.ndarray]:
        """(order, the first 4 bytes of the column's values in that order, as uint32), kept
        until the index changes: 8 bytes a file below 2**31 files (whole values: 24-40)."""
        # Sorted as one uint64 a file, the prefix above the place, in place: an argsort's
        # int64 result and a gather beside it held 24 bytes a file (and left RSS behind).
        if column not in self._sorted:
            n = len(self.index)
            if n >= 1 << 32:  # the place takes the low 32 bits
                raise InputError(f"{self.folder}: {n:,} files; at most 2**32 - 1 in one cache")
            packed = np.empty(n, np.uint64)
            for a in range(0, n, READ_ROWS):
                packed[a:a + READ_ROWS] = prefix4(self.index.block(column, a, a + READ_ROWS))
                packed[a:a + READ_ROWS] <<= np.uint64(32)
                packed[a:a + READ_ROWS] |= np.arange(a, min(a + READ_ROWS, n), dtype=np.uint64)
            packed.sort()  # the places are unique: no two equal
            order = (packed & np.uint64(0xFFFFFFFF)).astype(places(n))
            packed >>= np.uint64(32)
            self._sorted[column] = (order, packed.astype(np.uint32))
        return self._sorted[column]

    def _search(self, column: str, values: np.ndarray) -> np.ndarray:
        """The index row holding each of `values` in `column`, or -1: found by the first 4
        bytes and checked whole (values that share those bytes are walked)."""
        if not len(self.index):  # a first ingest: one -1 seen len(values) times, no memory
            return np.broadcast_to(np.int64(-1), (len(values),))
        order, have = self._sorted_column(column)
        out = np.empty(len(values), np.int64)
        for a in range(0, len(values), READ_ROWS):  # in blocks: no whole temporaries
            part = values[a:a + READ_ROWS]
            want = prefix4(part)
            by = np.argsort(want)  # searched in order: ~3x faster than keys at random
            first = np.empty(len(want), np.int64)
            first[by] = np.searchsorted(have, want[by])
            at = np.minimum(first, len(have) - 1)
            found = np.where(have[at] == want, order[at], -1)
            hit = np.flatnonzero(found >= 0)
            for i in hit[self.index.gather(column, found[hit]) != part[hit]]:
                found[i] = self._walk(column, part[i], int(first[i]))
            out[a:a + len(part)] = found
        return out

    def _walk(self, column: str, value: bytes, j: int) -> int:
        """The row holding `value` among those that share its first 4 bytes, which start
        at `j` of the sorted prefixes; -1 when none holds it."""
        order, have = self._sorted_column(column)
        value = np.array([value], self.index.DTYPES[column])  # compared whole: an element
        want = prefix4(value)[0]  # of an "S" array drops its trailing NUL bytes
        while j < len(have) and have[j] == want:
            if self.index.gather(column, order[j:j + 1]) == value:
                return int(order[j])
            j += 1
        return -1

    def lookup(self, keys: np.ndarray, keep: bool = False) -> np.ndarray:
        """The index row of each path key (S16 array), or -1 for a path not in the index.
        The sorted keys (8 bytes a file) are kept for the next call only with `keep`."""
        try:
            return self._search("key", keys)
        finally:
            if not keep:
                self._sorted.pop("key", None)

    def sort_digests(self) -> None:
        """Sort the index's digests for `find` now, on disk: workers forked after share them."""
        if "digest" not in self._sorted:
            self._sorted["digest"] = PrefixFile(
                len(self.index), lambda a, b: self.index.block("digest", a, b), self.folder)

    def find(self, digest: bytes) -> tuple[int, int, bytes] | None:
        """(start, count, check) of indexed rows decoded from content `digest`, if any."""
        if digest in self._forgotten or not len(self.index):
            return None
        self.sort_digests()
        i = self._sorted["digest"].find(digest, lambda j: self.index.block(
            "digest", j, j + 1).tobytes())
        if i < 0:
            return None
        start, count, check = (self.index.block(c, i, i + 1) for c in ("start", "count", "check"))
        return int(start[0]), int(count[0]), check.tobytes()  # no column read whole for it

    def arrays(self) -> dict[str, RowFile]:
        """Every column's committed rows, read on demand."""
        if self._out is not None:
            self._out.flush()
        return {name: RowFile(self._bin(name), dtype, shape, self.rows)
                for name, (shape, dtype) in self.columns.items()}

    def check_rows(self, start: int, count: int, check: bytes) -> bool:
        """Whether the cached rows [start, start + count) are still what was decoded."""
        if self._maps is None or len(next(iter(self._maps.values()))) < start + count:
            self._maps = self.arrays()
        checks = RowChecks(self.columns)
        for name in self.columns:
            step = max(1, (32 << 20) // self.row_bytes(name))
            for a in range(start, start + count, step):
                checks.feed(name, self._maps[name][a:min(a + step, start + count)])
        return checks.digest() == check

    # ---------------------------------------------------------------- writing
    def prepare(self, arrays: dict[str, np.ndarray]) -> Prepared:
        """One file's decoded rows made contiguous and checked: the part of appending that
        can run in a decoding worker."""
        laid, checks = self._laid_out(arrays), RowChecks(self.columns)
        checks.feed_all(laid)
        return Prepared(laid, _count(laid), checks.digest())

    def _laid_out(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The rows contiguous in the cache's dtypes and shapes."""
        count = _count(arrays)
        return {name: np.ascontiguousarray(arrays[name], dtype=dtype).reshape(count, *shape)
                for name, (shape, dtype) in self.columns.items()}

    def append(self, rows: Prepared | Iterable[dict[str, np.ndarray]]) -> tuple[int, int, bytes]:
        """Append the decoded rows of one file, prepared or as batches of column arrays;
        returns (start, count, check) for its record. Uncommitted until `commit`."""
        start = self.rows
        if isinstance(rows, Prepared):
            self._write(rows.arrays, behind=False)
            return start, rows.count, rows.check
        checks = RowChecks(self.columns)
        for arrays in rows:
            batch = self._laid_out(arrays)
            self._write(batch, behind=True)
            checks.feed_all(batch)  # the file's check; a batch's own would go unused
        return start, self.rows - start, checks.digest()

    def _write(self, arrays: dict[str, np.ndarray], behind: bool) -> None:
        # behind: a table's batches, decoded in this process, are written on the writer's
        # thread while the next one decodes (their writes were ~half a table's ingest)
        self._writer().write(arrays, behind)
        self._since_commit += sum(arr.nbytes for arr in arrays.values())
        self.rows += _count(arrays)

    def forget(self, digest: bytes) -> None:
        """Stop reusing the rows of `digest` (they were found altered)."""
        self._forgotten.add(digest)

    def due(self) -> bool:
        """Whether enough rows were appended since the last commit to commit again."""
        return self._since_commit >= COMMIT_BYTES

    def commit(self, parts: list[tuple[Rows, np.ndarray | None]], final: bool) -> None:
        """Make the rows appended so far durable and the index point at them. `parts` are
        records one after another (those a part's mask marks, or all), read a block at a
        time. With `final`, they are the whole new index (every file of the source, once),
        read back from the file from then on; otherwise the records completed so far, which
        win over older records of the same path, written after the index without a copy
        of either."""
        self._sync()
        if not final:
            self._write_index([(self.index, None), *parts], unique=False)
        else:
            self._sorted = {}  # the update's searches are over: their columns are let go
            if self.rows > 1024 and len(self.index) and \
                    live_rows(parts, self.rows) < self.rows // 2:
                self._compact(joined(parts))  # rare: a copy of every record, in memory
            else:
                self._write_index(parts, unique=True)
            self._set_index(StoredRecords(StoredIndex(self.folder / INDEX, check=False)))
            self._forgotten = set()
        self._since_commit = 0

    def _sync(self) -> None:
        self._writer().sync()

    def _write_index(self, parts: list[tuple[Rows, np.ndarray | None]], unique: bool) -> None:
        """The index as an uncompressed .npz of columns, each column the records of
        `parts` (those a part's mask marks) one after another, written in blocks: no
        concatenated copy is made. Not Arrow: pyarrow imports pandas on its first array,
        which costs an update more than the rest of its work."""
        # `unique`: the parts are a whole index (each path once), so a load needs no pass
        # to find each path's last record, which sorts every key and copies every record.
        meta = {**self._meta(), "gen": self.gen, "extra": self.extra, "unique": unique}
        with atomic_path(self.folder / INDEX) as tmp, open(tmp, "wb") as f:
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as npz:
                with npz.open("meta.npy", "w") as out:
                    np.lib.format.write_array(out, np.frombuffer(json.dumps(meta).encode(),
                                                                 np.uint8))
                for name in Records.DTYPES:
                    write_npy(npz, name, parts)
            f.flush()
            os.fsync(f.fileno())

    def _compact(self, records: Records) -> None:
        """Copy the live rows into the next generation of column files (in row order),
        point `records` at them and write them as the index."""
        old = self.arrays()
        self._close()
        self._maps = None
        _, first, which = np.unique(records.digest, return_index=True, return_inverse=True)
        order = np.argsort(records.start[first], kind="stable")
        first = first[order]
        gen, moved = self.gen + 1, np.cumsum(records.count[first]) - records.count[first]
        outs = {name: open(self._bin(name, gen), "wb") for name in self.columns}
        try:
            for i in first:
                a, n = int(records.start[i]), int(records.count[i])
                for name, f in outs.items():
                    f.write(memoryview(np.ascontiguousarray(old[name][a:a + n])).cast("B"))
            for f in outs.values():
                f.flush()
                os.fsync(f.fileno())
        finally:
            for f in outs.values():
                f.close()
        del old
        new_start = np.empty(len(first), np.int64)
        new_start[order] = moved
        records.start[:] = new_start[which.reshape(-1)]
        self.gen, self.rows = gen, int(records.count[first].sum())
        self._write_index([(records, None)], unique=True)  # the switch to the new generation
        for name in self.columns:
            self._bin(name, gen - 1).unlink(missing_ok=True)
