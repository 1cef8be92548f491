"""The workers of an update, and how their decoded rows come back.

Files decoded whole go to forked processes once there is enough to decode (`Pool`). The
pool's result pipe pickled each image's pixels, wrote them through a pipe and unpickled them
in the parent (at 64x64, 17% of a worker's time and 14% of the parent's; docs/benchmarks.md,
run U). So a forked pool comes with a `Slab`: an anonymous shared mapping made before the
fork, cut into one slot per file in flight. A worker copies its file's prepared rows into the
slot the parent gave its task (`hand`) and returns only their layout; the parent writes them
from the slot (`take`). Slots are given in the order tasks are submitted and read back in
that order, and there are twice as many as files in flight, so a slot is never given again
before its rows are written.
"""

from __future__ import annotations

import mmap
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from export.timing import usable_cores
from trainer.data.rowcheck import Prepared
from trainer.data.scan import fork_pool

SLAB_BYTES = 64 << 20  # at most; wider rows come back through the pipe as before
_SLAB = None  # (the pid of the process that made it, the Slab) while a forked pool runs


def hand(slot: int, rows):
    """In a worker: `rows` (a Prepared) through the slab when this process is a forked
    worker of the pool that has one; anything else as it is."""
    if _SLAB is None or os.getpid() == _SLAB[0] or not isinstance(rows, Prepared):
        return rows
    return _SLAB[1].put(slot, rows)


def take(rows):
    """In the parent: rows a worker handed through the slab, as a Prepared."""
    return _SLAB[1].take(rows) if isinstance(rows, Slotted) else rows


@dataclass
class Slotted:
    """Where one file's prepared rows lie in the slab."""

    slot: int
    layout: list[tuple[str, str, tuple[int, ...]]]  # (column, dtype, shape) in slot order
    count: int
    check: bytes


class Slab:
    def __init__(self, slots: int, slot_bytes: int):
        self.slots, self.slot_bytes = slots, slot_bytes
        self.buf = mmap.mmap(-1, slots * slot_bytes)  # MAP_SHARED | MAP_ANONYMOUS
        self.view = np.frombuffer(self.buf, np.uint8)

    @classmethod
    def for_rows(cls, row_bytes: int, in_flight: int) -> Slab | None:
        """A slot of one row for each of twice `in_flight` files (None past SLAB_BYTES)."""
        slots = 2 * in_flight
        return cls(slots, row_bytes) if slots * row_bytes <= SLAB_BYTES else None

    def put(self, slot: int, rows: Prepared) -> Slotted | Prepared:
        """In a worker: `rows` copied into `slot` (or returned as they are when too large)."""
        if sum(a.nbytes for a in rows.arrays.values()) > self.slot_bytes:
            return rows
        slot %= self.slots
        at, layout = slot * self.slot_bytes, []
        for name, arr in rows.arrays.items():
            self.view[at:at + arr.nbytes] = arr.reshape(-1).view(np.uint8)
            layout.append((name, arr.dtype.str, arr.shape))
            at += arr.nbytes
        return Slotted(slot, layout, rows.count, rows.check)

    def take(self, rows: Slotted) -> Prepared:
        """In the parent: the rows as views of their slot, valid until the slot is given
        again (they are written before that)."""
        at, arrays = rows.slot * self.slot_bytes, {}
        for name, dtype, shape in rows.layout:
            n = int(np.prod(shape)) * np.dtype(dtype).itemsize
            arrays[name] = self.view[at:at + n].view(dtype).reshape(shape)
            at += n
        return Prepared(arrays, rows.count, rows.check)


FORK_BYTES = 1 << 20  # less to decode than this: one thread beats starting processes
WORKER_FILES = 64  # files to decode that pay for forking one more worker


class Pool:
    """The workers of an update. Decoding many small files is mostly Python holding the
    GIL (pillow's per-image overhead; measured: threads on 2 cores ran slower than one),
    so files decoded whole go to forked processes, one per usable core, once there is
    enough to decode to pay for starting them (64 files and FORK_BYTES of encoded images,
    counted over the blocks so far); before that, one thread. A table's threads only hash:
    its batches are decoded ahead of their writing on threads of their own (ahead.py)."""

    def __init__(self, whole_files: bool, row_bytes: int, in_flight: int):
        self.whole_files, self.files, self.size = whole_files, 0, 0
        self.pool, self.forked = None, False
        self.row_bytes, self.in_flight = row_bytes, in_flight  # for the slab

    def get(self, files: int, size: int,
            known: int) -> ProcessPoolExecutor | ThreadPoolExecutor:
        """The pool for `files` more files of `size` bytes, of `known` files known now to
        need decoding (the listing's block's): a forked pool has one worker per usable core
        but at most one per WORKER_FILES of those, since forking a process of a few hundred
        MB costs milliseconds (16 on 2 cores: 0.4 s) and an update of a few hundred files
        needs few workers."""
        self.files, self.size, cores = self.files + files, self.size + size, usable_cores()
        fork = self.whole_files and self.files >= 64 and self.size >= FORK_BYTES and cores > 1
        if self.pool is None or fork and not self.forked:
            self.close()
            global _SLAB
            if fork:  # made before the workers are forked: they share it
                slab = Slab.for_rows(self.row_bytes, self.in_flight)
                _SLAB = None if slab is None else (os.getpid(), slab)
            self.pool, self.forked = (fork_pool(min(cores, max(2, known // WORKER_FILES)))
                                      if fork else
                                      ThreadPoolExecutor(1 if self.whole_files else cores)), fork
        return self.pool

    def close(self) -> None:
        """On an error, the queued files are not decoded for nothing."""
        global _SLAB
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool, _SLAB = None, None
