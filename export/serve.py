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

The pieces live beside it: export/serve_options.py (the settings, checked when made),
export/serve_payloads.py (request -> checked array, prediction -> response rows),
export/serve_oip.py (the Open Inference Protocol's routes, tensors and replies),
export/serve_batching.py (`Batcher`), export/serve_metrics.py (Prometheus and drift),
export/serve_http.py (the ASGI plumbing: body reads, replies, errors).
"""

from __future__ import annotations

import hmac
import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from export.card import Card
from export.errors import InputError
from export.serve_batching import Batcher, unwire_batch, wire_batch
from export.serve_http import body_receiver, error, read_body, replaced_body, respond
from export.serve_metrics import metrics_text, process_metrics
from export.serve_options import Limits, ServeOptions, key_warning
from export.serve_oip import (encode_infer, model_metadata, parse_infer, route,
                              server_metadata, unwire_tensors, wire_tensors)
from export.serve_payloads import (INLINE_PARSE_BYTES, RequestError, encode_rows, parse_request,
                                   parse_query, rows_of)

log = logging.getLogger(__name__)
EXTRA = "pip install '.[serve]' from a checkout, or 'frozenfit[serve]' from a wheel"
OPEN_ROUTES = ("/health", "/v2/health/live", "/v2/health/ready")  # no key asked
DRIFT_FLUSH_S = 0.25  # how stale /metrics' drift may be; a flush is one small JSON file


# ---------------------------------------------------------------- API server side


class Gate:
    """ASGI middleware of the API servers: admission, checking and metrics of /predict;
    /card and /metrics; /health reads 503 while draining. See the module docstring."""

    def __init__(self, app, *, card: Card, card_json: bytes, limits: Limits, shared: dict,
                 metrics_dir: str, max_batch_size: int, batch_timeout: float, slots: int,
                 model: tuple[str, str, str], key: str | None = None):
        self.app, self.card, self.card_json, self.limits = app, card, card_json, limits
        self.model = model  # name and version (inference protocol), SHA-256
        self.key = None if key is None else key.encode()
        self.inflight, self.draining = shared["inflight"], shared["draining"]
        self.metrics_dir = Path(metrics_dir)
        self.batching = (max_batch_size, batch_timeout, slots)
        self.batcher = None  # made on the first request, in this API server's event loop

    async def _send_batch(self, x: np.ndarray, parts: list) -> list[tuple[int, bytes]]:
        """One LitServe request for a batch; (status, body) for each of its parts."""
        wire = wire_batch(x, parts)
        sent = {"status": 500, "body": []}

        async def capture(message):
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            elif message["type"] == "http.response.body":
                sent["body"].append(message.get("body", b""))

        await self.app(replaced_body(self.scope, wire), body_receiver(wire), capture)
        body = b"".join(sent["body"])
        if sent["status"] != 200:
            return [(sent["status"], body)] * len(parts)
        return [(200, part.encode()) for part in json.loads(body)["bodies"]]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
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
            from starlette.concurrency import run_in_threadpool

            text = await run_in_threadpool(metrics_text, self.card, self.metrics_dir)
            text += ("# HELP frozenfit_requests_in_flight admitted and not yet answered\n"
                     "# TYPE frozenfit_requests_in_flight gauge\n"
                     f"frozenfit_requests_in_flight {self.inflight.value}\n")
            return await respond(send, 200, text.encode(),
                                  "text/plain; version=0.0.4; charset=utf-8")
        if path == "/health" and self.draining.value:
            return await respond(send, 503, b'{"status": "draining"}')
        return await self.app(scope, receive, send)

    def _authorized(self, scope) -> bool:
        """The request's key against ours, in constant time (hmac.compare_digest)."""
        headers = dict(scope["headers"])
        given = headers.get(b"x-api-key")
        if given is None:
            scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
            given = given.strip() if scheme.lower() == b"bearer" else b""
        return hmac.compare_digest(given, self.key)

    async def _protocol(self, scope, receive, send):
        """The Open Inference Protocol's routes (export/serve_oip.py)."""
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
        return await respond(send, status, json.dumps(doc).encode())

    async def _parse(self, scope, headers: dict, body: bytes, protocol: bool):
        """(checked array, what travels with it to the worker, the protocol's request)."""
        if protocol:
            parse, args = parse_infer, (body, headers.get(b"inference-header-content-length"),
                                        self.card, self.limits)
        else:
            answer = parse_query(scope.get("query_string", b"").decode("latin-1"), self.card)
            content_type = headers.get(b"content-type", b"").decode("latin-1")
            parse, args = parse_request, (body, content_type, self.card, self.limits)
        if len(body) > INLINE_PARSE_BYTES:
            from starlette.concurrency import run_in_threadpool

            parsed = await run_in_threadpool(parse, *args)
        else:
            parsed = parse(*args)
        if protocol:  # the worker returns raw tensors; this server encodes the reply
            return parsed[0], (1, None, True), parsed[1]
        return parsed, (*answer, False), None

    async def _predict(self, scope, receive, send, protocol: bool = False):
        start = time.perf_counter()
        metrics = process_metrics()
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
                return await error(send, 503, why, [(b"retry-after", b"1")])
            try:
                headers = dict(scope["headers"])
                body = await read_body(receive, headers, self.limits.max_body_bytes)
                x, asked, infer = await self._parse(scope, headers, body, protocol)
            except RequestError as exc:
                status = exc.status
                return await error(send, exc.status, str(exc))
            if self.batcher is None:  # LitServe's route, whichever route came first
                self.scope = {**{k: v for k, v in scope.items() if k != "state"},
                              "path": "/predict", "raw_path": b"/predict", "method": "POST",
                              "query_string": b""}
                self.batcher = Batcher(self._send_batch, *self.batching)
            status, reply = await self.batcher.submit(x, asked)
            kind, extra = "application/json", None
            if protocol and status == 200:
                reply, kind, extra = encode_infer(unwire_tensors(json.loads(reply)), infer,
                                                  self.card, *self.model)
            await respond(send, status, reply, kind, extra)
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


# ---------------------------------------------------------------- inference worker side


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
            log.info("worker %d: %s on %s, %d threads", os.getpid(), self.model,
                     self.predictor.provider, self.threads)
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
            return unwire_batch(request)

        def predict(self, batch):
            x, parts = batch
            start = time.perf_counter()
            pred = self.predictor.predict(x, batch_size=max(len(x), 1))
            metrics = process_metrics()
            metrics["inference"].observe(time.perf_counter() - start)
            metrics["batch_requests"].observe(len(parts))
            metrics["batch_rows"].observe(len(x))
            with self.lock:
                self.drift.update(x, pred)
                self.dirty = True
            bodies, at = [], 0
            for rows, (top_k, qhat, raw) in parts:
                part = rows_of(pred, at, at + rows)
                bodies.append(json.dumps(wire_tensors(part) if raw else {
                    "model_sha256": self.sha256, "predictions": encode_rows(
                        part, self.predictor.class_names, top_k, qhat)}))
                at += rows
            return bodies

        def encode_response(self, bodies):
            return {"bodies": bodies}


# ---------------------------------------------------------------- the command


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


def _drain_on_signals(server, shared: dict, timeout_s: float) -> None:
    """SIGTERM/SIGINT: refuse new requests (503), wait up to `timeout_s` for those in flight,
    then stop LitServe."""
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
            deadline = time.monotonic() + timeout_s
            while shared["inflight"].value and time.monotonic() < deadline:
                time.sleep(0.02)
            server._shutdown_event.set()  # LitServer.run's own stop (no public method)

        threading.Thread(target=wait_then_stop, daemon=True).start()

    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, drain)


def serve(model: str, options: ServeOptions) -> int:
    """Serve until SIGTERM/SIGINT; then refuse new requests, finish those in flight, exit 0."""
    from export.card import jsonable
    from export.runtime import Predictor

    limits = options.limits
    threads = _threads_per_worker(options.workers)
    loaded = Predictor(model, options.provider, threads)  # one-line errors before any process
    card, provider, sha256 = loaded.card, loaded.provider, loaded.sha256
    del loaded
    limits.check_model(card.input)
    _check_port(options.host, options.port)
    if warning := key_warning(options.host, options.api_key):
        print(warning, file=sys.stderr, flush=True)

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
                   "batch_timeout": options.batch_timeout_ms / 1000, "slots": 1,
                   "model": (options.name or Path(model).stem, "1", sha256),
                   "key": options.api_key})
    server = ls.LitServer(api, accelerator="cpu", devices=1,
                          workers_per_device=options.workers, middlewares=[gate],
                          disable_openapi_url=True, model_metadata={"sha256": sha256})
    _drain_on_signals(server, shared, options.drain_timeout_s)
    batching = (f"batches of up to {options.max_batch_size} requests within "
                f"{options.batch_timeout_ms:g} ms" if options.max_batch_size > 1
                else "no batching")
    print(f"serving {model} (sha256 {sha256[:12]}) at http://{options.host}:{options.port}: "
          f"POST /predict and /v2/models/{options.name or Path(model).stem}/infer, GET /card "
          f"/health /metrics /v2; {options.workers} worker(s) x "
          f"{threads} thread(s) on {provider}, {batching}", flush=True)
    try:
        server.run(host=options.host, port=options.port, log_level=options.log_level,
                   generate_client_file=False, num_api_servers=options.workers)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    print("serve: stopped", file=sys.stderr, flush=True)
    return 0
