"""Files decoded ahead of the thread that writes them, a few at a time, in order.

An update writes a table's files into the row cache one after another, batch by batch, on
one thread. Decoding a batch (Parquet or CSV decode, the float32 conversion) is most of
the work and runs in pyarrow and numpy with the GIL released, so the next files' batches
are decoded meanwhile, each file on a thread of its own: the files at most `width` places
ahead of the oldest one not yet written, each holding at most `depth` decoded batches.
Memory stays bounded (width x depth batches) however many files wait, and the writer
always finds its next file started: the oldest file is never kept waiting.
"""

from __future__ import annotations

import bisect
import queue
import threading
from collections.abc import Iterator

WAIT_S = 0.1  # how often a blocked producer looks whether it was abandoned


class Ahead:
    """`ahead(key, batches)` decodes `batches` on a thread of its own and returns the
    iterator the writer reads them from, in their order; `key` is the file's place in the
    writer's order. `close()` stops every producer (the update ended or failed)."""

    def __init__(self, width: int | None, depth: int = 2):
        # None: set before the first file (from what that file holds: tabular.py)
        self.width = None if width is None else max(1, width)
        self.depth = max(1, depth)
        self.cond = threading.Condition()
        self.open: list[int] = []  # keys of the files not yet written nor abandoned, sorted
        self.closed = False

    def __call__(self, key: int, batches: Iterator) -> _File:
        file = _File(self, key, batches)
        with self.cond:
            bisect.insort(self.open, key)
        threading.Thread(target=file.produce, daemon=True, name="decode-ahead").start()
        return file

    def _turn(self, key: int) -> bool:
        """Wait until `key` is among the `width` oldest open files; False: abandoned."""
        with self.cond:
            while not self.closed and key in self.open and \
                    bisect.bisect_left(self.open, key) >= self.width:
                self.cond.wait(WAIT_S)
            return not self.closed and key in self.open

    def _done(self, key: int) -> None:
        with self.cond:
            at = bisect.bisect_left(self.open, key)
            if at < len(self.open) and self.open[at] == key:
                del self.open[at]
                self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


_END = object()


class _File:
    """One file's batches: produced on their thread, read by the writer (or abandoned:
    `close()`, when the writer found its content elsewhere or failed)."""

    def __init__(self, ahead: Ahead, key: int, batches: Iterator):
        self.ahead, self.key, self.batches = ahead, key, batches
        self.queue: queue.Queue = queue.Queue(ahead.depth)
        self.stopped = False

    def _live(self) -> bool:
        return not (self.stopped or self.ahead.closed)

    def _put(self, item) -> bool:
        while self._live():
            try:
                self.queue.put(item, timeout=WAIT_S)
                return True
            except queue.Full:
                continue
        return False

    def produce(self) -> None:
        try:
            if not self.ahead._turn(self.key):
                return
            for batch in self.batches:
                if not self._put(batch):
                    return
            self._put(_END)
        except BaseException as exc:  # noqa: BLE001 (raised in the writer's thread)
            self._put(exc)
        finally:  # abandoned or done: the file's reader is let go now, not when collected
            getattr(self.batches, "close", lambda: None)()

    def __iter__(self):
        try:
            while True:
                try:
                    item = self.queue.get(timeout=WAIT_S)
                except queue.Empty:
                    if self.ahead.closed:
                        raise RuntimeError("the update was stopped") from None
                    continue
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self.stopped = True
        self.ahead._done(self.key)
