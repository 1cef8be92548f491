"""The ASGI app of one `trainer serve` API server process: every route, and the model.

`Gate` is the whole app (uvicorn runs it; no framework): it admits a `POST /predict` or an
inference-protocol `infer` (bounding the body (413) and the requests in flight across all
API servers (503)), reads and checks it against the model card with the same decoder
(export/imaging.py) and input check (export/runtime.check_input) as `trainer predict`, and
hands the checked array to its `Batcher`; a bad request gets a 4xx JSON error naming the
field and never reaches a batch. `GET /card`, `/metrics`, `/health` and the protocol's
metadata routes are answered here too.

`Runner` holds this process's `Predictor`: a batch runs on one inference thread
(onnxruntime releases the GIL, so the event loop keeps reading requests meanwhile), and its
rows go back as the columns `trainer predict` writes (export/batch.output_columns), or as
raw tensors that the protocol encodes. A batch expected to take less than INLINE_S (from
a one-row call timed at start) runs on the event loop itself: for a small model the hop to the
thread cost more than the inference. The rows and predictions are added to this process's
drift counts by a background thread every FLUSH_S, in one pass, and written with the
request counts (export/serve/metrics.Tally) for /metrics.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from export.card import Card
from export.errors import InputError
from export.runtime import Prediction
from export.serve.asgi import error, read_body, respond
from export.serve.batching import Batcher
from export.serve.metrics import Tally, metrics_text
from export.serve.oip import encode_infer, model_metadata, parse_infer, route, server_metadata
from export.serve.options import Limits
from export.serve.payloads import (INLINE_PARSE_BYTES, RequestError, dumps, encode_rows,
                                   parse_query, parse_request, rows_of)

log = logging.getLogger(__name__)
OPEN_ROUTES = ("/health", "/v2/health/live", "/v2/health/ready")  # no key asked
FLUSH_S = 0.25  # how stale /metrics may be; a flush is one small JSON file
MAX_PENDING_ROWS = 8192  # rows held for the next drift flush, at most
INLINE_S = 3e-4  # a batch expected to run faster than this runs on the event loop
ONE_ROW_MAX_S = 0.05  # the start's timing of a one-row call stops there


class Runner:
    """This process's model; see the module docstring."""

    def __init__(self, model: str, provider: str, threads: int, sha256: str, metrics_dir: str,
                 version: str):
        from export.drift import DriftAccumulator
        from export.runtime import Predictor

        self.predictor = Predictor(model, provider, threads, spin=False)
        self.sha256, self.version = sha256, version
        self.predictor.require(sha256)  # the model the server announced
        self.drift = DriftAccumulator(self.predictor.card)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="onnxruntime")
        self.lock, self.drift_lock = threading.Lock(), threading.Lock()
        self.pending, self.pending_rows = [], 0  # (x, prediction) not yet in the drift counts
        self.row_s = self._time_one_row(self.predictor)
        # What runs on the event loop is too small to repay waking a pool of threads: for a
        # model with such batches, a one-thread session of it runs them.
        self.inline = self.predictor
        if threads > 1 and self.row_s < INLINE_S:
            self.inline = Predictor(model, provider, 1, spin=False)
            self.inline.require(sha256)
            self.row_s = self._time_one_row(self.inline)
        self.tally = Tally()  # this process's request counts for /metrics
        self.dest = Path(metrics_dir) / f"api-{os.getpid()}.json"
        threading.Thread(target=self._flush, daemon=True).start()
        log.info("API server %d: %s on %s, %d threads", os.getpid(), model,
                 self.predictor.provider, threads)

    def _absorb(self) -> bool:
        """Add the pending rows to the drift counts, all in one pass (per request it cost
        more than the inference of a small model). Returns whether there were any."""
        with self.lock:
            pending, self.pending, self.pending_rows = self.pending, [], 0
        if not pending:
            return False
        x = np.concatenate([p[0] for p in pending])
        pred = Prediction(*(None if getattr(pending[0][1], f) is None else
                            np.concatenate([getattr(p[1], f) for p in pending])
                            for f in ("labels", "probabilities", "logits", "values")))
        with self.drift_lock:
            self.drift.update(x, pred)
        return True

    def _flush(self) -> None:
        """Every FLUSH_S: the drift counts and the request counts into this process's file
        of the metrics folder, when either changed."""
        from export.atomic import atomic_path

        while True:
            time.sleep(FLUSH_S)
            if self._absorb() or self.tally.changed:
                with self.drift_lock:
                    drift = self.drift.state()
                with atomic_path(self.dest) as tmp:
                    tmp.write_text(json.dumps({"tally": self.tally.state(), "drift": drift}))

    @staticmethod
    def _time_one_row(predictor) -> float:
        """Seconds of a one-row call, timed once at start. Not a running average of the
        served batches: their time includes waits for the GIL and the CPU under load, which
        sent ever more small batches to the thread and made them slower still."""
        from export.timing import medians

        spec = predictor.spec
        one = np.zeros((1, *spec.shape), spec.dtype)
        # The first call, stopped past ONE_ROW_MAX_S (a slow graph must not slow the start),
        # is also the warm-up; the calls timed after it carry no timer.
        try:
            predictor.predict(one, timeout=ONE_ROW_MAX_S)
        except InputError:  # slow, or failing on zeros: every batch goes to the thread
            log.info("API server %d: one row takes over %g s: batches run on the inference "
                     "thread", os.getpid(), ONE_ROW_MAX_S)
            return float("inf")
        seconds = medians({"one row": lambda: predictor.predict(one)})["one row"]
        log.info("API server %d: one row in %.3f ms on %s thread(s): batches of up to %d rows "
                 "run on the event loop", os.getpid(), seconds * 1e3, predictor.session.
                 get_session_options().intra_op_num_threads, int(INLINE_S // seconds))
        return seconds

    def quick(self, rows: int) -> bool:
        """Whether `rows` run in less time than handing them to the inference thread costs
        (a thread hop and GIL hand-offs, ~0.1 ms): then the event loop runs them itself.
        (The one-row time holds the call's fixed cost too: larger batches are overestimated,
        and sent to the thread the sooner.)"""
        return rows * self.row_s < INLINE_S

    def run(self, x: np.ndarray, parts: list) -> list[tuple[int, object]]:
        """One onnxruntime call for a batch; (200, reply) per part: a JSON body for
        /predict, the part's Prediction for the inference protocol."""
        start = time.perf_counter()
        predictor = self.inline if self.quick(len(x)) else self.predictor
        pred = predictor.predict(x, batch_size=max(len(x), 1))
        seconds = time.perf_counter() - start
        self.tally.batch(len(parts), len(x), seconds)
        with self.lock:
            self.pending.append((x, pred))
            self.pending_rows += len(x)
            full = self.pending_rows >= MAX_PENDING_ROWS
        if full:  # the flush thread fell behind: this batch pays, memory stays bounded
            self._absorb()
        replies, at = [], 0
        for rows, (top_k, qhat, raw) in parts:
            part = rows_of(pred, at, at + rows)
            replies.append((200, part if raw else dumps({
                "model_sha256": self.sha256, "model_version": self.version,
                "predictions": encode_rows(part, self.predictor.class_names, top_k, qhat)})))
            at += rows
        return replies


class Gate:
    """The ASGI app; see the module docstring. `start()` loads the model in the API server
    process (after the fork: an onnxruntime session does not survive one)."""

    def __init__(self, *, card: Card, card_json: bytes, limits: Limits, shared: dict,
                 metrics_dir: str, max_batch_size: int, batch_timeout: float,
                 model: tuple[str, str, str], runner_args: dict, key: str | None = None):
        self.card, self.card_json, self.limits = card, card_json, limits
        self.model = model  # name and version (inference protocol), SHA-256
        self.key = None if key is None else key.encode()
        # the shared counts' ctypes values, changed under the one lock (each `.value` of the
        # synchronized wrapper takes the lock again: six semaphore calls a request)
        self.admission = shared["inflight"].get_lock()
        self.inflight, self.draining = shared["inflight"].get_obj(), shared["draining"].get_obj()
        self.metrics_dir, self.runner_args = Path(metrics_dir), runner_args
        self.batching = (max_batch_size, batch_timeout, 1)  # one batch on the thread at a time
        self.runner = self.batcher = None
        self.begun: set | None = None  # the requests this process has begun (uvicorn's tasks)

    def start(self) -> None:
        self.runner = Runner(**self.runner_args)

    def _send_batch(self, x: np.ndarray, parts: list):
        """The Batcher's batch: its replies when small enough to run on the event loop,
        else an awaitable of them from the inference thread."""
        if self.runner.quick(len(x)):
            try:
                return self.runner.run(x, parts)
            except Exception as exc:  # noqa: BLE001 (logged there; the server goes on)
                return self._failed(exc, parts)
        return self._in_thread(x, parts)

    async def _in_thread(self, x: np.ndarray, parts: list) -> list:
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self.runner.pool, self.runner.run, x, parts)
        except Exception as exc:  # noqa: BLE001 (logged there; the server goes on)
            return self._failed(exc, parts)

    @staticmethod
    def _failed(exc: Exception, parts: list) -> list:
        """The requests of a batch whose inference failed get a 500; the server goes on."""
        log.exception("inference failed", exc_info=exc)
        body = dumps({"error": f"inference failed ({type(exc).__name__})"})
        return [(500, body)] * len(parts)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return  # no lifespan or websocket routes
        path, method = scope["path"], scope["method"]
        if self.key is not None and path not in OPEN_ROUTES and not self._authorized(scope):
            return await error(send, 401, "missing or wrong API key: send Authorization: "
                               "Bearer KEY or X-API-Key: KEY", [(b"www-authenticate", b"Bearer")])
        if path == "/predict" and method == "POST":
            return await self._predict(scope, receive, send)
        if path == "/v2" or path.startswith("/v2/"):
            return await self._protocol(scope, receive, send)
        if path == "/card" and method == "GET":
            return await respond(send, 200, self.card_json)
        if path == "/metrics" and method == "GET":
            text = await asyncio.get_running_loop().run_in_executor(
                None, metrics_text, self.card, self.metrics_dir)
            text += ("# HELP frozenfit_requests_in_flight admitted and not yet answered\n"
                     "# TYPE frozenfit_requests_in_flight gauge\n"
                     f"frozenfit_requests_in_flight {self.inflight.value}\n")
            return await respond(send, 200, text.encode(),
                                 "text/plain; version=0.0.4; charset=utf-8")
        if path == "/health" and method == "GET":
            draining = self.draining.value
            return await respond(send, 503 if draining else 200,
                                 b'{"status": "draining"}' if draining else b'{"status": "ok"}')
        return await error(send, 404, f"{method} {path}: no such route (POST /predict, GET "
                                      "/card /health /metrics, /v2/...)")

    def _authorized(self, scope) -> bool:
        """The request's key against ours, in constant time (hmac.compare_digest)."""
        headers = dict(scope["headers"])
        given = headers.get(b"x-api-key")
        if given is None:
            scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
            given = given.strip() if scheme.lower() == b"bearer" else b""
        return hmac.compare_digest(given, self.key)

    async def _protocol(self, scope, receive, send):
        """The Open Inference Protocol's routes (export/serve/oip.py)."""
        found, (name, version, _) = route(scope["path"]), self.model
        if found is None:
            return await error(send, 404, f"{scope['path']}: no such inference protocol route")
        what, asked, asked_version = found
        if asked is not None and (asked != name or asked_version not in (None, version)):
            return await error(send, 404, f"model {asked!r}" + (
                f" version {asked_version}" if asked_version else "") + f": this server "
                f"serves {name!r} version {version}")
        if (scope["method"] == "POST") != (what == "infer"):
            return await error(send, 405, f"{scope['method']} {scope['path']}: not allowed")
        if what == "infer":
            return await self._predict(scope, receive, send, protocol=True)
        ready = not self.draining.value
        doc = {"server": server_metadata, "live": lambda: {"live": True},
               "ready": lambda: {"ready": ready}, "metadata": lambda: model_metadata(
                   self.card, name, version)}[what]()
        status = 503 if what == "ready" and not ready else 200
        return await respond(send, status, dumps(doc))

    async def _parse(self, scope, headers: dict, body: bytes, protocol: bool):
        """(checked array, what its rows are answered with, the protocol's request)."""
        if protocol:
            parse, args = parse_infer, (body, headers.get(b"inference-header-content-length"),
                                        self.card, self.limits)
        else:
            answer = parse_query(scope.get("query_string", b"").decode("latin-1"), self.card)
            content_type = headers.get(b"content-type", b"").decode("latin-1")
            parse, args = parse_request, (body, content_type, self.card, self.limits)
        if len(body) > INLINE_PARSE_BYTES:  # off the event loop
            parsed = await asyncio.get_running_loop().run_in_executor(None, parse, *args)
        else:
            parsed = parse(*args)
        if protocol:  # raw tensors back; the reply is encoded below
            return parsed[0], (1, None, True), parsed[1]
        return parsed, (*answer, False), None

    async def _predict(self, scope, receive, send, protocol: bool = False):
        start = time.perf_counter()
        status, rows = 500, 0
        with self.admission:
            admitted = not self.draining.value and self.inflight.value < self.limits.max_queue
            if admitted:
                self.inflight.value += 1
        try:
            if not admitted:
                status = 503
                why = ("server is shutting down" if self.draining.value else
                       f"{self.limits.max_queue} requests in flight (--max-queue); retry later")
                return await error(send, 503, why, [(b"retry-after", b"1")])
            try:
                headers = dict(scope["headers"])
                body = await read_body(receive, headers, self.limits.max_body_bytes)
                x, asked, infer = await self._parse(scope, headers, body, protocol)
            except RequestError as exc:
                status = exc.status
                return await error(send, exc.status, str(exc))
            if self.batcher is None:  # made in this process's event loop
                begun = self.begun
                self.batcher = Batcher(self._send_batch, *self.batching, alone=None if begun
                                       is None else lambda: len(begun) <= 1)
            status, reply = await self.batcher.submit(x, asked)
            kind, extra = "application/json", None
            if protocol and status == 200:
                reply, kind, extra = encode_infer(reply, infer, self.card, *self.model)
            await respond(send, status, reply, kind, extra)
            rows = len(x) if status == 200 else 0
        finally:
            if admitted:
                with self.admission:
                    self.inflight.value -= 1
            self.runner.tally.request(status, time.perf_counter() - start, rows)
