"""Names of a huge folder held and sorted without one Python object per name.

A folder of millions of files listed as a list of str and sorted with `list.sort` costs ~200
to ~300 bytes a file while it is sorted (the str objects, the list, the tuples or the
encoded copies beside them; measured: 280 MiB to list a class folder of 1,000,000 images
for training, 195 MiB for a batch job). Here the names lie end to end in one buffer with
one end offset each, and are put in byte order by numpy sorts of their bytes eight at a
time (`byte_order`): the names' own bytes plus ~70 bytes a file while sorting, none after.
Python's `sorted` is not used because it needs the objects; for UTF-8 names byte order is
its order (UTF-8 keeps the order of code points). A folder of more than RUN names is sorted
in runs written to disk and merged as it is read (`SortedNames`), so memory is bounded by
RUN, not by the folder.
"""

from __future__ import annotations

import heapq
import os
import tempfile
from array import array
from collections.abc import Iterator

import numpy as np

from export.errors import InputError

RUN = 1 << 17  # names sorted in memory at once (~12 MB while sorted); more: runs on disk
BLOCK = 4096  # names handed on together
RUN_READ = 1024  # names read from each run at a time while the runs are merged
# MASKS[r]: the top r bytes of a big-endian uint64 (the bytes of a name that remain)
MASKS = np.array([((1 << 64) - 1) ^ ((1 << (64 - 8 * r)) - 1) for r in range(9)], np.uint64)


class PackedNames:
    """Byte strings (file names or relative paths: no NUL bytes) in the order added."""

    def __init__(self):
        self.blob, self.ends = bytearray(), array("q")

    def append(self, name: bytes) -> None:
        self.blob += name
        self.ends.append(len(self.blob))

    def add(self, prefix: bytes, names: list[bytes]) -> None:
        """Append prefix + name for each of `names`: one join and one cumulative sum for a
        folder's names (listing 101,000 images: 96 -> 72 ms with the sort, `append` per name
        before)."""
        if names:
            lengths = np.fromiter(map(len, names), np.int64, len(names)) + len(prefix)
            base = len(self.blob)
            self.blob += prefix + prefix.join(names)
            self.ends.frombytes((np.cumsum(lengths) + base).tobytes())

    def __len__(self) -> int:
        return len(self.ends)

    def start(self, i: int) -> int:
        return self.ends[i - 1] if i else 0

    def __getitem__(self, i: int) -> bytes:
        return bytes(self.blob[self.start(i):self.ends[i]])

    def order(self) -> np.ndarray:
        """The indices of the names in byte order (a stable sort)."""
        if not len(self):
            return np.zeros(0, np.int64)
        self.blob += bytes(8)  # every name's window of 8 bytes lies inside the buffer
        try:
            return byte_order(np.frombuffer(self.blob, np.uint8),
                              np.frombuffer(self.ends, np.int64))
        finally:  # the numpy views are gone: the buffer may be resized again
            del self.blob[-8:]

    def sorted(self) -> PackedNames:
        """These names in byte order, as a new PackedNames."""
        out = PackedNames()
        out.extend(self, self.order())
        return out

    def concat(self, other: PackedNames) -> None:
        """Append every name of `other`, in its order."""
        if len(other):
            base = len(self.blob)
            self.blob += other.blob
            self.ends.frombytes((np.frombuffer(other.ends, np.int64) + base).tobytes())

    def extend(self, other: PackedNames, rows: np.ndarray) -> None:
        """Append the names of `other` at `rows`, in that order: gathered by numpy a block
        of names at a time (a Python loop over a million names took ~1 s)."""
        src, ends = np.frombuffer(other.blob, np.uint8), np.frombuffer(other.ends, np.int64)
        for a in range(0, len(rows), 4096):  # ~1 MB of byte indices at a time
            block = rows[a:a + 4096]
            start = ends[block - 1]
            start[block == 0] = 0
            length = ends[block] - start
            end = np.cumsum(length)
            at = np.repeat(start - (end - length), length) + np.arange(end[-1] if len(end) else 0)
            self.ends.frombytes((end + len(self.blob)).tobytes())
            self.blob += src[at].tobytes()

    def in_order(self) -> Iterator[int]:
        """The indices of `order`, as ints made a block at a time (a list of a million
        ints would cost ~36 bytes each)."""
        order = self.order()
        for a in range(0, len(order), 4096):
            yield from order[a:a + 4096].tolist()


class SortedNames:
    """Names added in any order, read back in byte order a block at a time, holding at most
    RUN of them: past that, each RUN names are sorted and written to an unnamed file in
    `folder` (a sorted run; the system's temporary folder when None), and the runs are
    merged as they are read back. The merge is heapq's (~1 us a name), paid only by a
    folder of more than RUN names; below that it is one in-memory sort, as before."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder, self.names, self.runs, self.count = folder, PackedNames(), [], 0

    def add(self, prefix: bytes, names: list[bytes]) -> None:
        """Add prefix + name for each of `names`."""
        self.names.add(prefix, names)
        self.count += len(names)
        if len(self.names) >= RUN:
            self._spill()

    def __len__(self) -> int:
        return self.count

    def __getstate__(self):  # sent from a forked lister: only names held in memory travel
        if self.runs:
            raise TypeError("SortedNames with runs on disk stay in their process")
        return self.__dict__

    def _spill(self) -> None:
        run = self.names.sorted()
        try:
            f = tempfile.TemporaryFile(dir=self.folder)  # noqa: SIM115 (closed by close())
            self.runs.append((f, len(run)))
            f.write(np.frombuffer(run.ends, np.int64).tobytes())
            f.write(run.blob)
            f.flush()
        except OSError as exc:
            raise InputError(f"{self.folder or tempfile.gettempdir()}: cannot write the sorted "
                             f"names of a large folder ({exc.strerror})") from None
        self.names = PackedNames()

    def blocks(self) -> Iterator[PackedNames]:
        """The names in byte order, BLOCK at a time (in memory: one block of them all)."""
        if not self.runs:
            if len(self.names):
                yield self.names.sorted()
            return
        if len(self.names):
            self._spill()
        out = PackedNames()
        for name in heapq.merge(*(_run_names(f.fileno(), n) for f, n in self.runs)):
            out.append(name)
            if len(out) == BLOCK:
                yield out
                out = PackedNames()
        if len(out):
            yield out

    def __iter__(self) -> Iterator[bytes]:
        for block in self.blocks():
            yield from (block[i] for i in range(len(block)))

    def close(self) -> None:
        for f, _ in self.runs:
            f.close()
        self.runs, self.names = [], PackedNames()


def _run_names(fd: int, n: int) -> Iterator[bytes]:
    """The names of a sorted run (its n ends, then its bytes), RUN_READ at a time by pread
    (ten million names in 77 runs: ~5 MB of read buffers)."""
    done = 0
    for a in range(0, n, RUN_READ):
        ends = np.frombuffer(os.pread(fd, 8 * min(RUN_READ, n - a), 8 * a), np.int64)
        chunk = os.pread(fd, int(ends[-1]) - done, 8 * n + done)
        starts = [0, *(ends[:-1] - done).tolist()]
        yield from (chunk[s:e] for s, e in zip(starts, (ends - done).tolist()))
        done = int(ends[-1])


def byte_order(buf: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The order of the strings buf[ends[i-1]:ends[i]] (buf padded with 8 zero bytes past
    the last end), compared byte by byte. A radix sort from the front: all strings are
    sorted by their first 8 bytes (as big-endian integers, bytes past a string's end
    zero), then each run of strings equal so far by their next 8 bytes, and so on; a run
    stops when its strings end. Only strings still tied are sorted again, so names that
    share a long prefix cost a few passes more, never a copy of every name."""
    n = len(ends)
    windows = np.ndarray((len(buf) - 7,), ">u8", buf, 0, (1,))  # 8 bytes from each offset
    order, todo, run, depth = np.arange(n), np.arange(n), np.zeros(n, np.int64), 0
    while len(todo):
        rows = order[todo]
        key, remain = _keys(windows, ends, rows, depth)
        by = np.lexsort((key, run))  # stable: by run (ascending with position), then key
        order[todo] = rows[by]
        del rows
        key, run, remain = key[by], run[by], remain[by]
        del by
        tied = (run[1:] == run[:-1]) & (key[1:] == key[:-1]) & (remain[1:] == 8)
        del key, remain
        keep = np.zeros(len(run), bool)
        keep[1:] |= tied
        keep[:-1] |= tied
        run = np.cumsum(np.concatenate(([0], ~tied)))[keep]
        todo, depth = todo[keep], depth + 8
    return order


def _keys(windows: np.ndarray, ends: np.ndarray, rows: np.ndarray,
          depth: int) -> tuple[np.ndarray, np.ndarray]:
    """The bytes depth..depth+7 of each string of `rows` as a big-endian integer (bytes
    past its end zero), and how many of those bytes it has (0 to 8)."""
    start = ends[rows - 1]
    start[rows == 0] = 0
    length = ends[rows] - start
    remain = np.clip(length - depth, 0, 8).astype(np.uint8)
    np.minimum(length, depth, out=length)
    start += length
    del length
    return windows[start] & MASKS[remain], remain
