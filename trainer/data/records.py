"""The records of a row cache's index: one per source file, as numpy columns (never one
Python object per file), read from the stored index where they lie, held by an update a
block of files at a time (the rest in its spill file), and written to the index as .npy
columns block by block."""

from __future__ import annotations

import os
import struct
import sys
import tempfile
import tokenize
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol

import numpy as np

from export.atomic import naming


@dataclass
class Records:
    """One record per source file, as columns (numpy "S" columns hold raw bytes; read an
    element back with `.tobytes()` of a one-row slice: indexing drops trailing NULs)."""

    key: np.ndarray  # S16, filestat.path_key of the relative path
    size: np.ndarray  # int64
    mtime_ns: np.ndarray  # int64
    ino: np.ndarray  # uint64
    digest: np.ndarray  # S32, SHA-256 of the file's bytes
    start: np.ndarray  # int64, first row in the column files
    count: np.ndarray  # int64, rows decoded from the file
    check: np.ndarray  # S8, of the decoded rows (CRC-32 per column, combined)

    DTYPES = {"key": "S16", "size": np.int64, "mtime_ns": np.int64, "ino": np.uint64,
              "digest": "S32", "start": np.int64, "count": np.int64, "check": "S8"}

    @classmethod
    def empty(cls, n: int = 0) -> Records:
        return cls(**{k: np.zeros(n, d) for k, d in cls.DTYPES.items()})

    def __len__(self) -> int:
        return len(self.key)

    def columns(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def take(self, rows) -> Records:
        return Records(**{k: v[rows] for k, v in self.columns().items()})

    def block(self, name: str, a: int, b: int) -> np.ndarray:
        """Rows a..b-1 of column `name`."""
        return getattr(self, name)[a:b]

    def gather(self, name: str, rows: np.ndarray) -> np.ndarray:
        """The values of column `name` at `rows`."""
        return getattr(self, name)[rows]

    def extent(self) -> int:
        """The end of the rows the records point at (the largest start + count), walked in
        blocks."""
        return max((int((self.block("start", a, a + READ_ROWS)
                         + self.block("count", a, a + READ_ROWS)).max())
                    for a in range(0, len(self), READ_ROWS)), default=0)


READ_ROWS = 1 << 16  # records read from a stored index per block


def prefix4(values: np.ndarray) -> np.ndarray:
    """The first 4 bytes of each value of an S16 or S32 column (a hash), as uint32: what the
    index and the appended digests are searched by, each match then checked whole. Values
    that share them (a pair in 2**32; one lookup in ~400 at ten million files) are walked."""
    width = values.dtype.itemsize // 4
    return np.ascontiguousarray(values).view(np.uint32).reshape(len(values), width)[:, 0].copy()


def prefix_of(value: bytes) -> int:
    """One value's first 4 bytes as the uint32 that `prefix4` makes of them."""
    return int.from_bytes(value[:4], sys.byteorder)


def places(n: int) -> np.dtype:
    """The smallest dtype that holds n places and -1."""
    return np.dtype(np.int32 if n < 2**31 else np.int64)


class StoredIndex:
    """The columns of an index that `write_npy` wrote (an uncompressed .npz), read where
    they lie in the file with pread: whole, or a block of rows. Opening it checks that each
    member is a one-dimensional .npy of plain values within the file, and its CRC-32 (as
    np.load checks on a whole read), in 1 MiB pieces; the descriptor is kept, so a commit
    that replaces the file later does not change what is read."""

    def __init__(self, path: Path, check: bool = True):
        self.path, self._fd = path, None  # __del__ runs even when os.open fails
        self._fd = os.open(path, os.O_RDONLY)
        try:
            self.members = self._members(check)
        except BaseException:
            self.__del__()
            raise

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _members(self, check: bool) -> dict[str, tuple[int, np.dtype, int]]:
        """name -> (offset of its values, dtype, length); with `check`, each member's CRC-32
        checked (an index this process has just written and synced is not read again)."""
        out, size = {}, os.fstat(self._fd).st_size
        with open(self.path, "rb") as f, zipfile.ZipFile(f) as z:
            for info in z.infolist():
                if info.header_offset + info.file_size > size:
                    raise ValueError(f"{info.filename}: past the end of the file")
                if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
                    raise ValueError(f"{info.filename}: not a stored .npy")
                local = os.pread(self._fd, 30, info.header_offset)
                if len(local) != 30 or local[:4] != b"PK\x03\x04":
                    raise ValueError(f"{info.filename}: no local header")
                start = info.header_offset + 30 + sum(struct.unpack("<HH", local[26:30]))
                f.seek(start)
                shape, _, dtype, at = read_npy_header(f)
                if len(shape) != 1 or dtype.hasobject or \
                        at + shape[0] * dtype.itemsize != start + info.file_size:
                    raise ValueError(f"{info.filename}: not a column of {info.file_size} bytes")
                crc = 0 if check else info.CRC
                for a in range(start, start + info.file_size, 1 << 20) if check else ():
                    crc = zlib.crc32(os.pread(self._fd, min(1 << 20, start + info.file_size - a),
                                              a), crc)
                if crc != info.CRC:
                    raise ValueError(f"{info.filename}: CRC-32 differs")
                out[info.filename[:-4]] = (at, dtype, shape[0])
        missing = {"meta", *Records.DTYPES} - set(out)
        if missing or len({out[k][2] for k in Records.DTYPES}) != 1:
            raise ValueError(f"missing or uneven columns ({sorted(missing)})")
        return out

    def __len__(self) -> int:
        return self.members["key"][2]

    def read(self, name: str, a: int = 0, b: int | None = None) -> np.ndarray:
        at, dtype, n = self.members[name]
        a, b = min(a, n), n if b is None else min(b, n)
        return pread_rows(self._fd, dtype, at, a, b, f"{self.path}: ends inside {name}")


class StoredRecords(Records):
    """The records of a stored index, each column read whole the first time it is used;
    `block` and `gather` read rows of a column not read yet without reading the rest. A
    start with nothing changed compares the listing with its key and stat columns block by
    block, then reads the rows' starts whole and the digests a group at a time: 8 bytes a
    file held, not ~100."""

    def __init__(self, stored: StoredIndex):  # the dataclass's fields are set on first use
        self._stored = stored

    def __getattr__(self, name: str) -> np.ndarray:
        if name not in Records.DTYPES:
            raise AttributeError(name)
        value = self._stored.read(name).astype(Records.DTYPES[name], copy=False)
        setattr(self, name, value)
        return value

    def __len__(self) -> int:
        return len(self._stored)

    def block(self, name: str, a: int, b: int) -> np.ndarray:
        if name in self.__dict__:
            return super().block(name, a, b)
        return self._stored.read(name, a, b).astype(Records.DTYPES[name], copy=False)

    def gather(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows that lie close together (an update's matches follow the listing, which
        follows the index) are read as one span, or as a few spans apart (with a stray: the
        index searched by 4-byte prefixes meets another key's record first now and then);
        scattered ones read the column whole."""
        if name in self.__dict__:
            return super().gather(name, rows)
        if not len(rows):
            return self.block(name, 0, 0)
        lo, hi = int(rows.min()), int(rows.max()) + 1
        if hi - lo <= 4 * len(rows) + 64:
            return self.block(name, lo, hi)[rows - lo]
        order = np.argsort(rows, kind="stable")
        ranked = rows[order]
        cuts = np.flatnonzero(np.diff(ranked) > 4096) + 1
        parts = np.split(np.arange(len(rows)), cuts) if len(cuts) < 64 else []
        if not parts or any(ranked[p[-1]] - ranked[p[0]] > 4 * len(p) + 4096 for p in parts):
            return getattr(self, name)[rows]
        out = np.empty(len(rows), Records.DTYPES[name])
        for p in parts:
            a = int(ranked[p[0]])
            out[order[p]] = self.block(name, a, int(ranked[p[-1]]) + 1)[ranked[p] - a]
        return out



WRITE_ROWS = 1 << 14  # records written to the index (or walked) per block


def read_npy_header(f) -> tuple[tuple, bool, np.dtype, int]:
    """(shape, fortran order, dtype, offset of the values) of the .npy header at the file's
    position; raises ValueError (or KeyError for a version numpy does not write) if none."""
    version = np.lib.format.read_magic(f)
    read = {(1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0}[version]
    try:
        shape, fortran, dtype = read(f)
    except (SyntaxError, tokenize.TokenError) as exc:  # numpy retries a header that does not
        raise ValueError(f"not a .npy header ({exc})") from None  # parse as Python 2's
    return shape, fortran, dtype, f.tell()


def write_npy_header(f, dtype: np.dtype, n: int) -> None:
    """The header of a .npy file of `n` values of `dtype`, written before them in blocks."""
    np.lib.format.write_array_header_2_0(f, {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
        "shape": (n,)})


def part_blocks(parts: list[tuple[Rows, np.ndarray | None]], name: str) -> Iterator[np.ndarray]:
    """Column `name` of `parts` one after another (the rows a part's mask marks, or all),
    WRITE_ROWS rows at a time: what is written as one column of an index."""
    for rows, mask in parts:
        for b in range(0, len(rows), WRITE_ROWS):
            block = rows.block(name, b, b + WRITE_ROWS)
            yield block if mask is None else block[mask[b:b + WRITE_ROWS]]


def joined(parts: list[tuple[Rows, np.ndarray | None]]) -> Records:
    """The records of `parts` in memory, as one Records (for a compaction, which reorders
    every file's rows)."""
    return Records(**{name: np.concatenate([np.zeros(0, dtype), *part_blocks(parts, name)])
                      for name, dtype in Records.DTYPES.items()})


def live_rows(parts: list[tuple[Rows, np.ndarray | None]], rows: int) -> int:
    """How many of the cache's `rows` the records of `parts` point at (records of the same
    content share their rows), marked in a map of one byte a row: an image's one row, a
    table file's run of them. A sort of every record's start held 24 bytes a file."""
    covered = np.zeros(rows, bool)
    for start, count in zip(part_blocks(parts, "start"), part_blocks(parts, "count")):
        covered[start[count == 1]] = True
        for a, n in zip(start[count > 1].tolist(), count[count > 1].tolist()):
            covered[a:a + n] = True
    return int(np.count_nonzero(covered))


def write_npy(npz: zipfile.ZipFile, name: str,
              parts: list[tuple[Rows, np.ndarray | None]]) -> None:
    """Column `name` of `parts` as one .npy member of `npz`, as np.savez would write their
    concatenation, block by block: no concatenated copy is made."""
    dtype = np.dtype(Records.DTYPES[name])
    n = sum(len(r) if m is None else int(np.count_nonzero(m)) for r, m in parts)
    with npz.open(f"{name}.npy", "w", force_zip64=True) as out:
        write_npy_header(out, dtype, n)
        for block in part_blocks(parts, name):
            out.write(memoryview(np.ascontiguousarray(block, dtype)).cast("B"))


def pread_rows(fd: int, dtype: np.dtype, at: int, a: int, b: int, short: str) -> np.ndarray:
    """Values a..b-1 of a column of `dtype` that starts at byte `at` of file `fd`."""
    out = np.empty(max(0, b - a), dtype)
    view, offset = memoryview(out).cast("B"), at + a * dtype.itemsize
    while len(view):
        got = os.preadv(fd, [view], offset)
        if got <= 0:
            raise OSError(short)
        view, offset = view[got:], offset + got
    return out


class Head:
    """The first `n` of `records`: the part of an index that an update found unchanged
    (each path at its place, with its stats), written again without being read whole."""

    def __init__(self, records: Records, n: int):
        self.records, self.n = records, n

    def __len__(self) -> int:
        return self.n

    def block(self, name: str, a: int, b: int) -> np.ndarray:
        return self.records.block(name, a, min(b, self.n))


class Spill:
    """Records an update has completed, in the listing's order, written to unnamed files
    beside the cache (one a column) instead of held: an update holds a block of records,
    not ~100 bytes for every file, and reads them back a block at a time when it writes the
    index."""

    def __init__(self, folder: Path):
        self.folder, self._files = folder, {}
        try:
            with naming(folder):
                for name in Records.DTYPES:
                    self._files[name] = tempfile.TemporaryFile(dir=folder)
        except BaseException:
            self.close()
            raise
        self._n = 0

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def __len__(self) -> int:
        return self._n

    def append(self, rows: Rows, a: int, b: int) -> None:
        """Add records a..b-1 of `rows`."""
        with naming(self.folder):
            for name, f in self._files.items():
                f.write(memoryview(np.ascontiguousarray(rows.block(name, a, b))).cast("B"))
        self._n += b - a

    def block(self, name: str, a: int, b: int) -> np.ndarray:
        f, dtype = self._files[name], np.dtype(Records.DTYPES[name])
        with naming(self.folder):
            f.flush()
        return pread_rows(f.fileno(), dtype, 0, min(a, self._n), min(b, self._n),
                          f"{self.folder}: the update's spill file of {name} ends early")


class Rows(Protocol):
    """What an index is written from: records read a block of a column at a time."""

    def __len__(self) -> int: ...

    def block(self, name: str, a: int, b: int) -> np.ndarray: ...
