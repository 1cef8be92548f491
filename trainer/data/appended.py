"""The content appended during one update, found by its digest: for the files of one
content to share its rows. Sorted columns in memory, then past a fixed number a table on disk."""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Callable, Iterator

import numpy as np

from export.atomic import naming
from trainer.data.records import places, prefix_of


class Appended:
    """The content appended during one update: digest -> the record of the file it came
    from. Kept as sorted numpy columns of the digests' first 4 bytes and the places (8 bytes
    per file, where a dict costs ~140); the latest ones sit in a dict, merged in when it holds MERGE
    files or 1/32 of the columns, whichever is more: each merge moves the columns, so a
    fixed cadence would move them quadratically (5 s per million files), a growing one
    linearly (~4 bytes per file more in the dict). Past HELD of them (~36 MB) the rest go to
    a DiskTable: memory within a fixed allowance whatever the number of files."""

    MERGE = 4096
    MOVE = 1 << 16  # entries moved together by a merge
    HELD = 1 << 22  # entries held in memory

    def __init__(self, files: int = 0, folder: str | os.PathLike | None = None):
        """`files`: how many there may be (the listing's length; 0: unknown, all held in
        memory); `folder`: where a DiskTable lies (the system's temporary folder: None)."""
        self._prefix, self._row = np.zeros(0, np.uint32), np.zeros(0, places(files))
        self.n = 0
        self.latest: dict[bytes, int] = {}
        self.limit = self.MERGE
        self.files, self.folder, self.disk = files, folder, None

    @property
    def prefix(self) -> np.ndarray:
        return self._prefix[:self.n]

    @property
    def row(self) -> np.ndarray:
        return self._row[:self.n]

    def add(self, digest: bytes, row: int) -> None:
        if self.disk is not None:
            self.disk.add(prefix_of(digest), row)
            return
        self.latest[digest] = row
        if len(self.latest) >= self.limit:
            new = np.frombuffer(b"".join(d[:4] for d in self.latest), np.uint32)
            rows = np.fromiter(self.latest.values(), self._row.dtype, len(self.latest))
            order = np.argsort(new, kind="stable")
            self._merge(new[order], rows[order])
            self.latest, self.limit = {}, max(self.MERGE, self.n >> 5)
            if self.n >= self.HELD and self.files > self.n:  # the rest on disk
                self.disk = DiskTable(self.files - self.n, self.folder)

    def _merge(self, new: np.ndarray, rows: np.ndarray) -> None:
        """Merge sorted `new` (with their rows) into the columns in place: the entries
        already there are moved up, from the back, MOVE at a time, each past the new ones
        that sort before it (np.insert made new columns: twice their size at each merge).
        The columns grow by 1/8 when full, by realloc (large blocks are remapped, not
        copied)."""
        at = np.searchsorted(self.prefix, new)  # new value j goes before old entry at[j]
        if self.n + len(new) > len(self._prefix):
            size = max(self.n + len(new), len(self._prefix) * 9 // 8)
            for column in (self._prefix, self._row):
                column.resize(size, refcheck=False)  # no view of them outlives a call
        for b in range(self.n, 0, -self.MOVE):
            a = max(0, b - self.MOVE)
            dest = np.arange(a, b) + np.searchsorted(at, np.arange(a, b), side="right")
            self._prefix[dest], self._row[dest] = self._prefix[a:b].copy(), self._row[a:b].copy()
        dest = at + np.arange(len(new))
        self._prefix[dest], self._row[dest] = new, rows
        self.n += len(new)

    def get(self, digest: bytes, digest_of: Callable[[int], bytes]) -> int | None:
        """The row of `digest`; `digest_of(row)` gives the whole digest of a row."""
        if digest in self.latest:
            return self.latest[digest]
        key = prefix_of(digest)
        for j in range(np.searchsorted(self.prefix, key), len(self.prefix)):
            if self.prefix[j] != key:
                break
            if digest_of(int(self.row[j])) == digest:
                return int(self.row[j])
        for row in self.disk.places(key) if self.disk is not None else ():
            if digest_of(row) == digest:
                return row
        return None


class DiskTable:
    """Places by the first 4 bytes of a digest, in an unnamed sparse file: open addressing
    over a power of two of 8-byte slots (the prefix above the place + 1; 0: empty), at
    least twice the entries it may get, so a probe ends within a line or two. A line of
    LINE slots is read with one pread (~2 us an add or a get, in the page cache); nothing
    per entry in memory. Digests that share their first 4 bytes each have a slot: the
    caller checks the whole digest of each place."""

    LINE = 8

    def __init__(self, entries: int, folder: str | os.PathLike | None):
        self.slots = 1 << max(6, (2 * entries - 1).bit_length())
        self.folder = folder or tempfile.gettempdir()
        with naming(self.folder):
            self.file = tempfile.TemporaryFile(dir=folder)  # noqa: SIM115 (let go with self)
            os.ftruncate(self.file.fileno(), self.slots * 8)  # sparse: disk as slots are written

    def _probe(self, prefix: int) -> Iterator[tuple[int, int]]:
        """(slot, value) from the prefix's own slot on, a line at a time."""
        at = prefix & (self.slots - 1)  # a hash's bits: spread evenly
        while True:
            n = self.LINE - at % self.LINE
            line = os.pread(self.file.fileno(), n * 8, at * 8)
            if len(line) < n * 8:
                raise OSError(f"{self.folder}: the appended digests' table ends early")
            yield from enumerate(struct.unpack(f"<{n}Q", line), at)
            at = (at + n) & (self.slots - 1)

    def add(self, prefix: int, place: int) -> None:
        for slot, value in self._probe(prefix):
            if not value:
                with naming(self.folder):
                    os.pwrite(self.file.fileno(), struct.pack("<Q", prefix << 32 | place + 1),
                              slot * 8)
                return

    def places(self, prefix: int) -> Iterator[int]:
        for _, value in self._probe(prefix):
            if not value:
                return
            if value >> 32 == prefix:
                yield (value & 0xFFFFFFFF) - 1
