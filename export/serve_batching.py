"""Dynamic batching in `trainer serve`'s API servers: concurrent requests' checked arrays
stacked into one onnxruntime call (`Batcher`)."""

from __future__ import annotations

import numpy as np


# What a request asked for: top_k, its conformal threshold, raw tensors (the inference protocol)
Answer = tuple[int, "float | None", bool]


class Batcher:
    """Dynamic batching in the API server: the checked arrays of concurrent requests are
    stacked into one onnxruntime call on the process's inference thread, and the result is
    split back into one response per request. `send_batch(x, parts)` runs one batch.

    A batch leaves at once while fewer than `slots` batches are in flight (no waiting at
    low load); otherwise requests gather until a batch comes back, until `max_requests`
    have gathered, or until the oldest has waited `timeout` seconds, whichever is first."""

    def __init__(self, send_batch, max_requests: int, timeout: float, slots: int):
        import asyncio

        self.loop = asyncio.get_running_loop()
        self.send_batch, self.max_requests = send_batch, max(1, max_requests)
        self.timeout, self.slots = timeout, max(1, slots)
        self.pending: list = []
        self.in_flight, self.timer = 0, None

    async def submit(self, x: np.ndarray, answer) -> tuple[int, bytes]:
        """(status, body) of this request's response; `answer` travels with its rows."""
        future = self.loop.create_future()
        self.pending.append((x, answer, future))
        if self.in_flight < self.slots or len(self.pending) >= self.max_requests:
            self._flush()
        elif self.timer is None:
            self.timer = self.loop.call_later(self.timeout, self._flush)
        return await future

    def _flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        while self.pending:
            batch, self.pending = (self.pending[:self.max_requests],
                                   self.pending[self.max_requests:])
            self.in_flight += 1
            self.loop.create_task(self._run(batch))
            if self.in_flight >= self.slots and len(self.pending) < self.max_requests:
                break
        if self.pending and self.timer is None:
            self.timer = self.loop.call_later(self.timeout, self._flush)

    async def _run(self, batch: list) -> None:
        try:
            x = batch[0][0] if len(batch) == 1 else np.concatenate([b[0] for b in batch])
            results = await self.send_batch(x, [(len(b[0]), b[1]) for b in batch])
            for (_, _, future), result in zip(batch, results):
                future.set_result(result)
        except BaseException as exc:  # the requests of this batch fail with it, not hang
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self.in_flight -= 1
            if self.pending and self.in_flight < self.slots:
                self._flush()
