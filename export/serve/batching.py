"""Dynamic batching in `trainer serve`'s API servers: concurrent requests' checked arrays
stacked into one onnxruntime call (`Batcher`)."""

from __future__ import annotations

import numpy as np

# What a request asked for: top_k, its conformal threshold, raw tensors (the inference protocol)
Answer = tuple[int, "float | None", bool]


class Batcher:
    """Dynamic batching in the API server: the checked arrays of concurrent requests are
    stacked into one onnxruntime call, and the result is split back into one response per
    request. `send_batch(x, parts)` runs one batch: it returns the replies when it ran the
    batch on the event loop itself (a small one), or an awaitable of them (the inference
    thread).

    A batch leaves at the end of the event loop's turn while fewer than `slots` batches are
    in flight, with every request read in that turn (no waiting at low load; under load,
    what arrived together runs together); otherwise requests gather until a batch comes
    back, until `max_requests` have gathered, or until the oldest has waited `timeout`
    seconds, whichever is first. `alone()`, when given, says whether the request submitting
    is the only one this process has begun: then nothing can join it and, with no batch in
    flight, it runs at once, without the two turns of the loop a gathering costs."""

    def __init__(self, send_batch, max_requests: int, timeout: float, slots: int,
                 alone=None):
        import asyncio

        self.loop = asyncio.get_running_loop()
        self.send_batch, self.max_requests = send_batch, max(1, max_requests)
        self.timeout, self.slots = timeout, max(1, slots)
        self.alone = alone or (lambda: False)
        self.pending: list = []
        self.in_flight, self.timer, self.soon = 0, None, False

    async def submit(self, x: np.ndarray, answer) -> tuple[int, bytes]:
        """(status, body) of this request's response; `answer` travels with its rows."""
        future = self.loop.create_future()
        self.pending.append((x, answer, future))
        if len(self.pending) >= self.max_requests or (
                self.in_flight == 0 and len(self.pending) == 1 and self.alone()):
            self._flush()
        elif self.in_flight < self.slots:
            if not self.soon:  # after the requests this turn of the loop has read
                self.soon = True
                self.loop.call_soon(self._flush)
        elif self.timer is None:
            self.timer = self.loop.call_later(self.timeout, self._flush)
        return await future

    def _flush(self) -> None:
        self.soon = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        while self.pending:
            batch, self.pending = (self.pending[:self.max_requests],
                                   self.pending[self.max_requests:])
            self._start(batch)
            if self.in_flight >= self.slots and len(self.pending) < self.max_requests:
                break
        if self.pending and self.timer is None:
            self.timer = self.loop.call_later(self.timeout, self._flush)

    def _start(self, batch: list) -> None:
        self.in_flight += 1
        try:
            x = batch[0][0] if len(batch) == 1 else np.concatenate([b[0] for b in batch])
            results = self.send_batch(x, [(len(b[0]), b[1]) for b in batch])
        except BaseException as exc:  # noqa: BLE001 (_fail raises what is not an Exception)
            self.in_flight -= 1
            self._fail(batch, exc)
            return
        if isinstance(results, list):  # it ran on the event loop: _flush goes on
            self.in_flight -= 1
            self._answer(batch, results)
        else:
            self.loop.create_task(self._wait(batch, results))

    async def _wait(self, batch: list, results) -> None:
        try:
            self._answer(batch, await results)
        except BaseException as exc:  # noqa: BLE001 (_fail raises what is not an Exception)
            self._fail(batch, exc)
        finally:  # a batch came back: what gathered meanwhile leaves
            self.in_flight -= 1
            if self.pending and self.in_flight < self.slots:
                self._flush()

    @staticmethod
    def _answer(batch: list, results: list) -> None:
        for (_, _, future), result in zip(batch, results):
            if not future.done():  # (a request whose client went away was cancelled)
                future.set_result(result)

    @staticmethod
    def _fail(batch: list, exc: BaseException) -> None:
        """The requests of a failed batch fail with it, never hang."""
        for _, _, future in batch:
            if not future.done():
                future.set_exception(exc)
        if not isinstance(exc, Exception):
            raise exc
