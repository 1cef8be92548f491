"""`trainer serve`: the frozen model over HTTP, on LitServe. No torch.

Two kinds of process, both LitServe's:

- API servers (uvicorn, forked by LitServer.run). `Gate`, an ASGI middleware in front of
  every route, admits a `POST /predict`: it bounds the body (413) and the requests in flight
  across all API servers (503), reads JSON instances or one raw image, and checks them
  against the model card with the same decoder (export/imaging.py) and input check
  (export/runtime.check_input) as `trainer predict`; a bad request gets a 4xx JSON error
  naming the field. Only a checked array goes on to LitServe's queue, so one bad request
  can never fail the other requests of a batch. `GET /card` and `GET /metrics` are routes of
  the same app; LitServe's own `GET /health` answers 200 once a worker has its session.
- Dynamic batching happens in the API server (`Batcher`): the checked arrays of concurrent
  requests, up to `max_batch_size` of them, gathered while a batch is in flight and for at
  most `batch_timeout`, are stacked into one LitServe request; why not LitServe's own
  batching is in Batcher's docstring.
- Inference workers (spawned by LitServer). `OnnxAPI` holds one `Predictor`; it runs each
  batch as one onnxruntime call and encodes one response body per request, its rows with
  export/batch.output_columns, the columns `trainer predict` writes.

Metrics: prometheus_client's multiprocess mode (one file per process in a private folder),
and the workers' drift counts (export/drift.DriftAccumulator state, flushed every 0.25 s)
merged at scrape time into the same PSI and Holm-corrected tests as a batch job's report.
SIGTERM/SIGINT: new requests get 503, the ones in flight finish, then LitServe shuts down.
"""

from __future__ import annotations

import base64
import binascii
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np

from export.card import Card, InputSpec
from export.errors import InputError
from export.runtime import Prediction, check_input, describe_input

EXTRA = "pip install '.[serve]' from a checkout, or 'frozenfit[serve]' from a wheel"
IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg")
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
DRIFT_FLUSH_S = 0.25  # how stale /metrics' drift may be; a flush is one small JSON file
INLINE_PARSE_BYTES = 64 << 10  # larger bodies are decoded off the event loop


@dataclass
class Limits:
    max_body_bytes: int = 16 << 20
    max_instances: int = 1024
    max_queue: int = 512  # requests in flight across API servers; more get 503

    def __post_init__(self):  # messages name the command's flags
        from export.timing import available_memory

        for flag, value in (("--max-instances", self.max_instances),
                            ("--max-queue", self.max_queue)):
            if value < 1:
                raise InputError(f"{flag} must be >= 1")
        if not self.max_body_bytes > 0:
            raise InputError("--max-body-mb must be > 0")
        held, avail = self.max_queue * self.max_body_bytes, available_memory()
        if avail is not None and held > avail // 2:
            raise InputError(f"--max-queue {self.max_queue} x --max-body-mb "
                             f"{self.max_body_bytes / 2**20:g}: up to {held / 2**30:.1f} GiB of "
                             f"request bodies could be held; at most "
                             f"{avail / 2 / 2**30:.1f} GiB (half of the memory available)")

    def check_model(self, spec: InputSpec) -> None:
        """Every request in flight decoded at once must fit in half the available memory."""
        from export.timing import available_memory

        decoded, avail = self.max_queue * self.max_instances * spec.row_bytes, available_memory()
        if avail is not None and decoded > avail // 2:
            raise InputError(f"--max-queue {self.max_queue} x --max-instances "
                             f"{self.max_instances}: up to {decoded / 2**30:.1f} GiB of this "
                             f"model's decoded inputs could be held; at most "
                             f"{avail / 2 / 2**30:.1f} GiB (half of the memory available)")


class RequestError(Exception):
    """A request the server refuses: HTTP status and one line naming the field."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------- request -> checked array


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(422, f"{where}: expected a number, got {json.dumps(value)[:40]}")
    return value


def _table_row(inst, columns: list[str], i: int) -> list[float]:
    if isinstance(inst, dict):
        missing = [c for c in columns if c not in inst]
        if missing:
            raise RequestError(422, f"instances[{i}]: missing feature {missing[0]!r}; the "
                                    f"model expects {columns}")
        return [_number(inst[c], f"instances[{i}].{c}") for c in columns]
    if isinstance(inst, list):
        if len(inst) != len(columns):
            raise RequestError(422, f"instances[{i}]: {len(inst)} values, expected "
                                    f"{len(columns)} (features {columns})")
        return [_number(v, f"instances[{i}][{j}]") for j, v in enumerate(inst)]
    raise RequestError(422, f"instances[{i}]: expected an object of features {columns} or "
                            f"a list of {len(columns)} numbers")


def _image(data: bytes, spec: InputSpec, where: str) -> np.ndarray:
    from export.imaging import decode

    try:
        return decode(data, spec, where)
    except InputError as exc:
        raise RequestError(400, str(exc)) from None


def _raw_image_array(inst: list, spec: InputSpec, where: str) -> np.ndarray:
    """A nested list of pixel values: integers in [0, 255] for a uint8 graph."""
    try:
        arr = np.asarray(inst)
    except ValueError:  # ragged nesting
        raise RequestError(422, f"{where}: expected {describe_input(spec)} per instance; "
                                "got a ragged nested list") from None
    if arr.dtype.kind not in "iuf":
        raise RequestError(422, f"{where}: expected numbers ({describe_input(spec)}), got "
                                f"{arr.dtype.kind == 'b' and 'booleans' or 'non-numbers'}")
    if np.dtype(spec.dtype) == np.uint8:
        if not (np.isfinite(arr).all() and (arr == np.round(arr)).all()
                and arr.min(initial=0) >= 0 and arr.max(initial=0) <= 255):
            raise RequestError(422, f"{where}: expected integers in [0, 255] for the model's "
                                    "uint8 input")
        arr = arr.astype(np.uint8)
    shape = spec.shape
    if arr.shape != shape and not (shape[0] == 1 and arr.shape == shape[1:]):
        raise RequestError(422, f"{where}: expected one instance of shape {shape} "
                                f"({describe_input(spec)}), got shape {arr.shape}")
    try:
        return check_input(spec, arr[None], where)[0]
    except InputError as exc:
        raise RequestError(422, str(exc)) from None


def parse_request(body: bytes, content_type: str, card: Card, limits: Limits) -> np.ndarray:
    """The body of a POST /predict as the checked model input (N, ...)."""
    spec = card.input
    image = spec.image
    media = content_type.split(";")[0].strip().lower()
    if media in IMAGE_TYPES:
        if not image:
            raise RequestError(415, f"Content-Type {media}: this model takes table rows; "
                                    "send JSON {\"instances\": [...]}")
        return _image(body, spec, "body")[None]
    if media not in ("application/json", ""):
        raise RequestError(415, f"Content-Type {media}: expected application/json"
                                f"{' or image/png or image/jpeg' if image else ''}")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise RequestError(400, f"body: not valid JSON ({str(exc)[:80]})") from None
    instances = doc.get("instances") if isinstance(doc, dict) else None
    if not isinstance(instances, list) or not instances:
        raise RequestError(422, "instances: expected a non-empty list, as in "
                                "{\"instances\": [...]}")
    if len(instances) > limits.max_instances:
        raise RequestError(413, f"instances: {len(instances)} in one request; at most "
                                f"{limits.max_instances} (--max-instances)")
    if not image:
        rows = [_table_row(inst, list(spec.columns or ()), i) for i, inst in enumerate(instances)]
        try:
            return check_input(spec, np.asarray(rows, np.float64), "instances")
        except InputError as exc:
            raise RequestError(422, str(exc)) from None
    out = []
    for i, inst in enumerate(instances):
        where = f"instances[{i}]"
        if isinstance(inst, str):
            try:
                data = base64.b64decode(inst, validate=True)
            except (binascii.Error, ValueError):
                raise RequestError(400, f"{where}: not base64 (expected a base64 PNG or JPEG "
                                        "or a nested list of pixels)") from None
            out.append(_image(data, spec, where))
        elif isinstance(inst, list):
            out.append(_raw_image_array(inst, spec, where))
        else:
            raise RequestError(422, f"{where}: expected a base64 PNG/JPEG string or a nested "
                                    f"list ({describe_input(spec)} per instance)")
    return np.stack(out)


def parse_top_k(query: str, card: Card) -> int:
    values = parse_qs(query).get("top_k")
    if not values:
        return 1
    classes = len(card.class_names)
    try:
        k = int(values[-1])
    except ValueError:
        k = 0
    if card.regression or not 1 <= k <= classes:
        raise RequestError(422, f"top_k: expected an integer from 1 to {classes}, got "
                                f"{values[-1]!r}" if classes else
                                "top_k: this model is a regressor; it has no classes")
    return k


def _wire(x: np.ndarray, parts: list[tuple[int, int]]) -> bytes:
    """The checked arrays of one batch, stacked, as the JSON LitServe queues for a worker;
    `parts`: (rows, top_k) of each request, in order."""
    return json.dumps({"x": base64.b64encode(x.tobytes()).decode(), "shape": list(x.shape),
                       "dtype": str(x.dtype), "parts": parts}).encode()


def _unwire(doc: dict) -> tuple[np.ndarray, list[tuple[int, int]]]:
    x = np.frombuffer(base64.b64decode(doc["x"]), dtype=doc["dtype"]).reshape(doc["shape"])
    return x, [(int(rows), int(top_k)) for rows, top_k in doc["parts"]]


class Batcher:
    """Dynamic batching in the API server: the checked arrays of concurrent requests are
    stacked into one LitServe request, so a batch makes one trip through LitServe's queues
    and one onnxruntime call, and is split back into one response per request.

    Ours rather than LitServe's own batching (which the worker side would offer): LitServe
    moves every request separately through multiprocessing Manager queues to the worker
    and back, about 1 ms of CPU per request, so its batching only amortised the (0.04 ms
    per image) onnxruntime call: 1.05x at concurrency 64 (scripts/bench_serve.py, README).

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

    async def submit(self, x: np.ndarray, top_k: int) -> tuple[int, bytes]:
        """(status, body) of this request's response."""
        future = self.loop.create_future()
        self.pending.append((x, top_k, future))
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


# ---------------------------------------------------------------- metrics


def _metrics() -> dict:
    """This process's metrics, created once (prometheus_client writes them to its own file
    in PROMETHEUS_MULTIPROC_DIR, so every API server and worker adds to the same totals)."""
    global _METRICS
    if _METRICS is None:
        from prometheus_client import Counter, Histogram

        _METRICS = {
            "requests": Counter("frozenfit_requests", "POST /predict requests by HTTP status",
                                ["status"], registry=None),
            "errors": Counter("frozenfit_request_errors", "refused or failed requests by "
                              "HTTP status", ["status"], registry=None),
            "instances": Counter("frozenfit_instances", "instances predicted", registry=None),
            "latency": Histogram("frozenfit_request_seconds", "POST /predict latency, queue "
                                 "included", buckets=LATENCY_BUCKETS, registry=None),
            "batch_requests": Histogram("frozenfit_batch_requests", "requests stacked into one "
                                        "onnxruntime call", buckets=BATCH_BUCKETS, registry=None),
            "batch_rows": Histogram("frozenfit_batch_rows", "rows in one onnxruntime call",
                                    buckets=BATCH_BUCKETS, registry=None),
            "inference": Histogram("frozenfit_inference_seconds", "one onnxruntime call",
                                   buckets=LATENCY_BUCKETS, registry=None),
        }
    return _METRICS


_METRICS = None


def metrics_text(card: Card, folder: Path) -> str:
    """Prometheus text: the counters of all processes, then the running drift report."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    from export.drift import DriftAccumulator

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(folder))
    lines = [generate_latest(registry).decode()]
    drift = DriftAccumulator(card)
    for state_file in sorted(folder.glob("drift-*.json")):
        try:
            drift.merge(json.loads(state_file.read_text()))
        except (OSError, ValueError):  # a worker replacing its file right now: next scrape
            continue
    report = drift.report() if drift.counts["rows"] else {"status": "inconclusive", "rows": 0,
                                                          "checks": []}
    code = {"ok": 0, "warn": 1, "drift": 2, "inconclusive": 3}.get(report["status"], -1)
    lines += ["# HELP frozenfit_drift_rows rows seen by the drift tests since start",
              "# TYPE frozenfit_drift_rows gauge", f"frozenfit_drift_rows {report['rows']}",
              ("# HELP frozenfit_drift_status 0 ok, 1 warn, 2 drift, 3 inconclusive (too few rows "
               "so far), -1 no reference in the card"),
              "# TYPE frozenfit_drift_status gauge", f"frozenfit_drift_status {code}"]
    for name, key in (("psi", "psi"), ("p_adjusted", "p_adjusted")):
        lines += [(f"# HELP frozenfit_drift_{name} per check, inputs and predictions seen "
                   "so far vs the card's validation reference"),
                  f"# TYPE frozenfit_drift_{name} gauge"]
        lines += [f'frozenfit_drift_{name}{{check="{c["name"]}"}} {c[key]:.6g}'
                  for c in report["checks"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- API server side


class Gate:
    """ASGI middleware of the API servers: admission, checking and metrics of /predict;
    /card and /metrics; /health reads 503 while draining. See the module docstring."""

    def __init__(self, app, *, card: Card, card_json: bytes, limits: Limits, shared: dict,
                 metrics_dir: str, max_batch_size: int, batch_timeout: float, slots: int):
        self.app, self.card, self.card_json, self.limits = app, card, card_json, limits
        self.inflight, self.draining = shared["inflight"], shared["draining"]
        self.metrics_dir = Path(metrics_dir)
        self.batching = (max_batch_size, batch_timeout, slots)
        self.batcher = None  # made on the first request, in this API server's event loop

    async def _send_batch(self, x: np.ndarray, parts: list) -> list[tuple[int, bytes]]:
        """One LitServe request for a batch; (status, body) for each of its parts."""
        wire = _wire(x, parts)
        sent = {"status": 500, "body": []}

        async def capture(message):
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            elif message["type"] == "http.response.body":
                sent["body"].append(message.get("body", b""))

        await self.app(_replaced_body(self.scope, wire), _body_receiver(wire), capture)
        body = b"".join(sent["body"])
        if sent["status"] != 200:
            return [(sent["status"], body)] * len(parts)
        return [(200, part.encode()) for part in json.loads(body)["bodies"]]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        if path == "/predict" and method == "POST":
            return await self._predict(scope, receive, send)
        if path == "/card" and method == "GET":
            return await _respond(send, 200, self.card_json)
        if path == "/metrics" and method == "GET":
            from starlette.concurrency import run_in_threadpool

            text = await run_in_threadpool(metrics_text, self.card, self.metrics_dir)
            text += ("# HELP frozenfit_requests_in_flight admitted and not yet answered\n"
                     "# TYPE frozenfit_requests_in_flight gauge\n"
                     f"frozenfit_requests_in_flight {self.inflight.value}\n")
            return await _respond(send, 200, text.encode(),
                                  "text/plain; version=0.0.4; charset=utf-8")
        if path == "/health" and self.draining.value:
            return await _respond(send, 503, b'{"status": "draining"}')
        return await self.app(scope, receive, send)

    async def _predict(self, scope, receive, send):
        start = time.perf_counter()
        metrics = _metrics()
        status = 500
        with self.inflight.get_lock():
            admitted = not self.draining.value and self.inflight.value < self.limits.max_queue
            if admitted:
                self.inflight.value += 1
        try:
            if not admitted:
                status = 503
                why = ("server is shutting down" if self.draining.value else
                       f"{self.limits.max_queue} requests in flight (--max-queue); retry later")
                return await _error(send, 503, why, [(b"retry-after", b"1")])
            try:
                headers = dict(scope["headers"])
                body = await _read_body(receive, headers, self.limits.max_body_bytes)
                top_k = parse_top_k(scope.get("query_string", b"").decode("latin-1"), self.card)
                content_type = headers.get(b"content-type", b"").decode("latin-1")
                if len(body) > INLINE_PARSE_BYTES:
                    from starlette.concurrency import run_in_threadpool

                    x = await run_in_threadpool(parse_request, body, content_type, self.card,
                                                self.limits)
                else:
                    x = parse_request(body, content_type, self.card, self.limits)
            except RequestError as exc:
                status = exc.status
                return await _error(send, exc.status, str(exc))
            if self.batcher is None:
                self.scope = {k: v for k, v in scope.items() if k != "state"}
                self.scope["query_string"] = b""
                self.batcher = Batcher(self._send_batch, *self.batching)
            status, answer = await self.batcher.submit(x, top_k)
            await _respond(send, status, answer)
            if status == 200:
                metrics["instances"].inc(len(x))
        finally:
            if admitted:
                with self.inflight.get_lock():
                    self.inflight.value -= 1
            metrics["requests"].labels(str(status)).inc()
            if status >= 400:
                metrics["errors"].labels(str(status)).inc()
            metrics["latency"].observe(time.perf_counter() - start)


async def _read_body(receive, headers: dict, limit: int) -> bytes:
    declared = headers.get(b"content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise RequestError(413, f"body: {int(declared):,} bytes; at most {limit:,} "
                                        "(--max-body-mb)")
        except ValueError:
            raise RequestError(400, "Content-Length: not a number") from None
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise RequestError(400, "body: the client disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"body: more than {limit:,} bytes (--max-body-mb)")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def _replaced_body(scope: dict, body: bytes) -> dict:
    headers = [(k, v) for k, v in scope["headers"]
               if k not in (b"content-length", b"content-type")]
    headers += [(b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode())]
    return {**scope, "headers": headers, "state": {}}


def _body_receiver(body: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _respond(send, status: int, body: bytes, content_type: str = "application/json",
                   extra: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()),
                            (b"content-length", str(len(body)).encode()), *(extra or [])]})
    await send({"type": "http.response.body", "body": body})


async def _error(send, status: int, message: str, extra: list | None = None) -> None:
    await _respond(send, status, json.dumps({"error": message}).encode(), extra=extra)


# ---------------------------------------------------------------- inference worker side


def _slice(pred: Prediction, a: int, b: int) -> Prediction:
    return Prediction(*(None if v is None else v[a:b] for v in
                        (pred.labels, pred.probabilities, pred.logits, pred.values)))


def encode_rows(pred: Prediction, class_names: list[str], top_k: int) -> list[dict]:
    """One dict per row with the columns `trainer predict` writes (export/batch.py)."""
    from export.batch import output_columns

    cols = output_columns(pred, None, class_names, top_k)
    return [{k: v[i] for k, v in cols.items()} for i in range(len(next(iter(cols.values()))))]


try:  # the serve extra; without it `trainer serve` says what to install
    import litserve as ls
except ModuleNotFoundError:
    ls = None

if ls is not None:

    class OnnxAPI(ls.LitAPI):
        """One onnxruntime session per worker process; see the module docstring. Each
        request it gets is a batch the API server's `Batcher` stacked."""

        def __init__(self, model: str, provider: str, threads: int, sha256: str,
                     metrics_dir: str):
            super().__init__(api_path="/predict")  # batches are made in the API server
            self.model, self.provider, self.threads = model, provider, threads
            self.sha256, self.metrics_dir = sha256, metrics_dir

        def setup(self, device):
            from export.drift import DriftAccumulator
            from export.runtime import Predictor

            self.predictor = Predictor(self.model, self.provider, self.threads, spin=False)
            self.predictor.require(self.sha256)  # the model the server announced
            self.drift = DriftAccumulator(self.predictor.card)
            self.lock, self.dirty = threading.Lock(), False
            threading.Thread(target=self._flush_drift, daemon=True).start()

        def _flush_drift(self):
            from export.atomic import atomic_path

            dest = Path(self.metrics_dir) / f"drift-{os.getpid()}.json"
            while True:
                time.sleep(DRIFT_FLUSH_S)
                with self.lock:
                    if not self.dirty:
                        continue
                    state, self.dirty = self.drift.state(), False
                with atomic_path(dest) as tmp:
                    tmp.write_text(json.dumps(state))

        def decode_request(self, request):
            return _unwire(request)

        def predict(self, batch):
            x, parts = batch
            start = time.perf_counter()
            pred = self.predictor.predict(x, batch_size=max(len(x), 1))
            metrics = _metrics()
            metrics["inference"].observe(time.perf_counter() - start)
            metrics["batch_requests"].observe(len(parts))
            metrics["batch_rows"].observe(len(x))
            with self.lock:
                self.drift.update(x, pred)
                self.dirty = True
            bodies, at = [], 0
            for rows, top_k in parts:
                rows_out = encode_rows(_slice(pred, at, at + rows), self.predictor.class_names,
                                       top_k)
                bodies.append(json.dumps({"model_sha256": self.sha256,
                                          "predictions": rows_out}))
                at += rows
            return bodies

        def encode_response(self, bodies):
            return {"bodies": bodies}


# ---------------------------------------------------------------- the command


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    max_batch_size: int = 64
    batch_timeout_ms: float = 5.0
    provider: str = "auto"
    limits: Limits = None
    drain_timeout_s: float = 30.0
    log_level: str = "warning"

    def __post_init__(self):  # messages name the command's flags
        from export.timing import usable_cores

        self.limits = self.limits or Limits()
        for flag, value in (("--workers", self.workers), ("--max-batch-size", self.max_batch_size)):
            if value < 1:
                raise InputError(f"{flag} must be >= 1")
        if not 1024 <= self.port <= 65535:
            raise InputError(f"--port {self.port}: expected 1024 to 65535")
        if self.batch_timeout_ms < 0:
            raise InputError("--batch-timeout-ms must be >= 0")
        # A batch gathers requests in flight, of which there are at most max_queue.
        self.max_batch_size = min(self.max_batch_size, self.limits.max_queue)
        cores = usable_cores()
        if self.workers > 4 * cores:
            raise InputError(f"--workers {self.workers}: at most {4 * cores} (4 per core of the "
                             f"{cores} this process may use); each holds a session")


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise InputError(f"--host {host} --port {port}: cannot listen there "
                             f"({exc.strerror or exc})") from None


def _threads_per_worker(workers: int) -> int:
    from export.timing import usable_cores

    return max(1, usable_cores() // workers)


def serve(model: str, options: ServeOptions) -> int:
    """Serve until SIGTERM/SIGINT; then refuse new requests, finish those in flight, exit 0."""
    from export.card import jsonable
    from export.runtime import Predictor

    limits = options.limits
    threads = _threads_per_worker(options.workers)
    probe = Predictor(model, options.provider, threads)  # one-line errors before any process
    card, provider, sha256 = probe.card, probe.provider, probe.sha256
    del probe
    limits.check_model(card.input)
    _check_port(options.host, options.port)

    metrics_dir = tempfile.mkdtemp(prefix="frozenfit-serve-")
    # prometheus_client picks its multiprocess mode when first imported: set the folder
    # first (the forked API servers and spawned workers inherit it).
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        import litserve  # noqa: F401
        import prometheus_client  # noqa: F401
    except ModuleNotFoundError as exc:
        shutil.rmtree(metrics_dir, ignore_errors=True)
        raise InputError(f"serving needs the serve extra (missing module {exc.name}): "
                         f"{EXTRA}") from None
    shared = {"inflight": mp.Value("i", 0), "draining": mp.Value("i", 0)}
    api = OnnxAPI(str(model), options.provider, threads, sha256, metrics_dir)
    # One batch in flight per worker and API server (there are as many API servers as
    # workers): a batch leaves as soon as a worker can take it.
    gate = (Gate, {"card": card, "card_json": json.dumps(jsonable(card)).encode(),
                   "limits": limits, "shared": shared, "metrics_dir": metrics_dir,
                   "max_batch_size": options.max_batch_size,
                   "batch_timeout": options.batch_timeout_ms / 1000, "slots": 1})
    server = ls.LitServer(api, accelerator="cpu", devices=1,
                          workers_per_device=options.workers, middlewares=[gate],
                          disable_openapi_url=True, model_metadata={"sha256": sha256})
    main_pid = os.getpid()

    def drain(signum, frame):
        if os.getpid() != main_pid:  # LitServe's forked queue manager: the main process
            return                       # shuts it down once the requests are answered
        if shared["draining"].value:
            return
        shared["draining"].value = 1
        print(f"serve: {signal.Signals(signum).name}: finishing {shared['inflight'].value} "
              "requests in flight, refusing new ones", file=sys.stderr, flush=True)

        def wait_then_stop():
            deadline = time.monotonic() + options.drain_timeout_s
            while shared["inflight"].value and time.monotonic() < deadline:
                time.sleep(0.02)
            server._shutdown_event.set()  # LitServer.run's own stop (no public method)

        threading.Thread(target=wait_then_stop, daemon=True).start()

    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, drain)
    batching = (f"batches of up to {options.max_batch_size} requests within "
                f"{options.batch_timeout_ms:g} ms" if options.max_batch_size > 1
                else "no batching")
    print(f"serving {model} (sha256 {sha256[:12]}) at http://{options.host}:{options.port}: "
          f"POST /predict, GET /card /health /metrics; {options.workers} worker(s) x "
          f"{threads} thread(s) on {provider}, {batching}", flush=True)
    try:
        server.run(host=options.host, port=options.port, log_level=options.log_level,
                   generate_client_file=False, num_api_servers=options.workers)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    print("serve: stopped", file=sys.stderr, flush=True)
    return 0
