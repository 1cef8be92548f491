"""The raw column files of the row cache: rows read with pread (`RowFile`), appended by
`ColumnWriter`."""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np


GAP_BYTES = 8 << 10  # rows closer than this are read together with what lies between
SPAN_BYTES = 1 << 20  # at most this much read at once for rows that are not consecutive


class RowFile:
    """The rows of one column file, indexed like a read-only array (an int, a slice or an
    array of rows gives a numpy copy) and read with `pread`. Chosen over np.memmap: pages a
    memory map has read count in the process's RSS until the kernel needs them back, so a
    fit over a large dataset would show an RSS as large as the data; with pread they sit in
    the page cache only. Consecutive rows are read in one call; each process (DataLoader
    workers included) opens its own descriptor."""

    def __init__(self, path: Path, dtype: np.dtype, row_shape: tuple[int, ...], rows: int):
        self.path, self.dtype, self.row_shape = path, np.dtype(dtype), tuple(row_shape)
        self.shape, self.ndim = (rows, *self.row_shape), 1 + len(self.row_shape)
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self._fd, self._pid = None, None

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": None}

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)

    def _fileno(self) -> int:
        if self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def _read(self, out: np.ndarray, first: int) -> None:
        view, offset = memoryview(out).cast("B"), first * self.row_bytes
        while len(view):
            got = os.preadv(self._fileno(), [view], offset)
            if got <= 0:
                raise OSError(f"{self.path}: ends before row {offset // self.row_bytes}")
            view, offset = view[got:], offset + got

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self[np.array([key])][0]
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1:
                out = np.empty((max(0, stop - start), *self.row_shape), self.dtype)
                self._read(out, start)
                return out
            key = np.arange(start, stop, step)
        rows = np.asarray(key, dtype=np.int64).reshape(-1)
        rows = np.where(rows < 0, rows + len(self), rows)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"{self.path}: row out of range ({len(self)} rows)")
        if len(rows):
            lo, hi = int(rows.min()), int(rows.max()) + 1
            if hi - lo <= 4 * len(rows) and (hi - lo) * self.row_bytes <= 64 << 20:
                return self[lo:hi][rows - lo]  # dense rows: one read of their whole span
        order = np.argsort(rows, kind="stable")
        ordered = np.empty((len(rows), *self.row_shape), self.dtype)
        sorted_rows = rows[order]
        # One read a stretch of rows less than GAP_BYTES apart (a pread costs ~2 us here,
        # as long as copying ~10 KB from the page cache), of at most SPAN_BYTES: a sample of
        # 100,000 of 8M labels was 100,000 preads of 8 bytes (0.2 s), now 16 reads.
        gap, span = max(1, GAP_BYTES // self.row_bytes), max(1, SPAN_BYTES // self.row_bytes)
        starts = np.flatnonzero(np.diff(sorted_rows, prepend=-gap - 1) > gap).tolist()
        for a, b in zip(starts, [*starts[1:], len(rows)]):
            while a < b:
                first = int(sorted_rows[a])
                e = a + int(np.searchsorted(sorted_rows[a:b], first + span))
                last = int(sorted_rows[e - 1]) + 1
                if last - first == e - a and (np.diff(sorted_rows[a:e]) == 1).all():  # in place
                    self._read(ordered[a:e], first)
                else:
                    stretch = np.empty((last - first, *self.row_shape), self.dtype)
                    self._read(stretch, first)
                    ordered[a:e] = stretch[sorted_rows[a:e] - first]
                a = e
        out = np.empty_like(ordered)
        out[order] = ordered
        return out


class ColumnWriter:
    """The column files of one generation, open for appending at the given byte offsets.
    `write(arrays, behind=True)` writes on a thread of its own and returns: the caller
    decodes the next batch meanwhile. The write before is waited for first, so rows stay in
    order and at most one batch is held. A write that failed there is raised by the next
    `write`, `flush` or `sync`, and by every one after: rows past it were never written, so
    nothing may be committed after it (the records of files whose last batch was in flight
    would point at them)."""

    def __init__(self, paths: dict[str, Path], offsets: dict[str, int]):
        self.files = {}
        for name, path in paths.items():
            self.files[name] = f = open(path, "r+b", buffering=1 << 20)
            f.seek(offsets[name])
        self.thread: ThreadPoolExecutor | None = None
        self.pending: Future | None = None
        self.failed: BaseException | None = None

    def write(self, arrays: dict[str, np.ndarray], behind: bool) -> None:
        self._wait()
        parts = [(self.files[name], memoryview(arr).cast("B")) for name, arr in arrays.items()]
        if not behind:
            _write_parts(parts)
            return
        if self.thread is None:
            self.thread = ThreadPoolExecutor(1, thread_name_prefix="cache-write")
        self.pending = self.thread.submit(_write_parts, parts)

    def _wait(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None and self.failed is None:
            self.failed = pending.exception()
        if self.failed is not None:
            raise self.failed

    def flush(self) -> None:
        """Everything written reaches the files (readable by another descriptor)."""
        self._wait()
        for f in self.files.values():
            f.flush()

    def sync(self) -> None:
        """Everything written is durable."""
        self.flush()
        for f in self.files.values():
            os.fsync(f.fileno())

    def close(self) -> None:
        """Closes the files once the write in flight ends (a failure of it is not raised:
        nothing after it was committed)."""
        if self.thread is not None:
            self.thread.shutdown()  # waits for it
        for f in self.files.values():
            try:
                f.close()
            except OSError:  # the buffer's flush failed likewise
                pass


def _write_parts(parts: list) -> None:
    for f, data in parts:
        f.write(data)
