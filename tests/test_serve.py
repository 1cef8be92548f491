"""`trainer serve`: the real server (a supervisor and its forked uvicorn API servers, each
with its own onnxruntime session) started as a subprocess on 127.0.0.1, talked to over HTTP with http.client. Every server here runs
with torch and lightning poisoned, so serving is proven torch-free."""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from export.card import jsonable, read_card
from export.runtime import Predictor
from export.serve.payloads import encode_rows
from tests.conftest import assert_one_line_error, poisoned_env, run_cli
from tests.helpers import looping_model

pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install '.[serve]')")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`trainer serve` in a subprocess; `request` is one HTTP exchange on a new connection."""

    def __init__(self, model: Path | str, tmp: Path, *flags: str, env: dict | None = None):
        self.port = free_port()
        env = {**os.environ, **poisoned_env(tmp), **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "trainer", "serve", "--model", str(model), "--port",
             str(self.port), *flags], cwd=tmp, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.communicate()
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError("server did not become healthy in 90 s")

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json", timeout: float = 30):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body, {"Content-Type": content_type} if body else {})
            resp = conn.getresponse()
            return resp.status, resp.read(), dict(resp.getheaders())
        finally:
            conn.close()

    def predict(self, instances: list, query: str = "") -> tuple[int, dict]:
        status, body, _ = self.request("POST", "/predict" + query,
                                       json.dumps({"instances": instances}).encode())
        return status, json.loads(body)

    def metrics(self) -> dict[str, float]:
        time.sleep(0.6)  # the API servers write their counts every 0.25 s
        return self.parse(self.request("GET", "/metrics")[1].decode())

    @staticmethod
    def parse(text: str) -> dict[str, float]:
        """Prometheus text as {series with its labels: value}."""
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}

    def pids(self) -> list[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)],
                             capture_output=True, text=True, check=False).stdout.split()
        return [self.proc.pid, *map(int, out)]

    def stop(self) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, out, err


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr[0]).save(buf, format="PNG")
    return buf.getvalue()


def _expected(predictor: Predictor, x: np.ndarray, top_k: int = 1) -> list[dict]:
    return encode_rows(predictor.predict(x), predictor.class_names, top_k)


def _close(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in g:
            if "confidence" in k or k == "value":
                assert abs(g[k] - w[k]) <= 1e-6, (k, g, w)
            else:
                assert g[k] == w[k], (k, g, w)


@pytest.fixture(scope="module")
def image_server(digits_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    server = Server(digits_run / "model.onnx", tmp, "--max-instances", "64",
                    "--max-body-mb", "0.25")
    yield server
    code, _, err = server.stop()
    assert code == 0, err


@pytest.fixture(scope="module")
def digits_x(digits_test_npz):
    with np.load(digits_test_npz) as npz:
        return npz["x"]


def test_predictions_equal_the_predictor_for_arrays_pngs_and_raw_bodies(
        image_server, digits_run, digits_x):
    model = digits_run / "model.onnx"
    predictor, x = Predictor(model), digits_x[:40]
    status, doc = image_server.predict(x.tolist())
    assert status == 200, doc
    assert doc["model_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    _close(doc["predictions"], _expected(predictor, x))
    status, doc = image_server.predict([base64.b64encode(_png(a)).decode() for a in x],
                                       "?top_k=3")
    assert status == 200, doc
    _close(doc["predictions"], _expected(predictor, x, top_k=3))
    assert doc["predictions"][0]["top3_label"] in predictor.class_names
    status, body, _ = image_server.request("POST", "/predict", _png(x[7]), "image/png")
    assert status == 200, body
    _close(json.loads(body)["predictions"], _expected(predictor, x[7:8]))


def test_coverage_adds_the_prediction_set_trainer_predict_writes(image_server, digits_run,
                                                                  digits_x):
    from export.conformal import threshold

    predictor, x = Predictor(digits_run / "model.onnx"), digits_x[:30]
    status, doc = image_server.predict(x.tolist(), "?coverage=0.9&top_k=2")
    assert status == 200, doc
    qhat = threshold(predictor.card.calibration, 0.9, "model")
    want = encode_rows(predictor.predict(x), predictor.class_names, 2, qhat)
    assert [r["prediction_set"] for r in doc["predictions"]] == [r["prediction_set"] for r in want]
    assert [r["set_size"] for r in doc["predictions"]] == [r["set_size"] for r in want]
    _close(doc["predictions"], want)


def test_card_health_and_metrics(image_server, digits_run, digits_x):
    status, body, _ = image_server.request("GET", "/card")
    assert status == 200
    assert json.loads(body) == json.loads(json.dumps(jsonable(read_card(digits_run / "model.onnx"))))
    assert image_server.request("GET", "/health")[0] == 200
    before = image_server.metrics()
    assert image_server.predict(digits_x[:5].tolist())[0] == 200
    assert image_server.predict([[1, 2]])[0] == 422
    after = image_server.metrics()
    grew = lambda key: after.get(key, 0) - before.get(key, 0)
    assert grew('frozenfit_requests_total{status="200"}') == 1
    assert grew('frozenfit_requests_total{status="422"}') == 1
    assert grew('frozenfit_request_errors_total{status="422"}') == 1
    assert grew("frozenfit_instances_total") == 5
    assert grew("frozenfit_batch_rows_sum") == 5
    assert grew("frozenfit_request_seconds_count") == 2
    assert grew("frozenfit_drift_rows") == 5
    assert after["frozenfit_drift_status"] in (1, 2, 3)  # 5 rows: never ok
    assert any(k.startswith('frozenfit_drift_psi{check="pixel mean"}') for k in after)


def test_without_orjson_the_standard_librarys_json_reads_and_writes_the_same(
        digits_run, digits_x, tmp_path):
    """orjson (the serve extra) is only faster: without it a request and its refusal read
    the same and the reply carries the same predictions."""
    predictor = Predictor(digits_run / "model.onnx")
    server = Server(digits_run / "model.onnx", tmp_path,
                    env=poisoned_env(tmp_path, ("torch", "lightning", "orjson")))
    try:
        status, doc = server.predict(digits_x[:3].tolist(), "?top_k=2")
        refused, body, _ = server.request("POST", "/predict", b"{instances: ")
    finally:
        code, _, err = server.stop()
    assert code == 0, err
    assert status == 200 and doc["model_sha256"] == predictor.sha256
    _close(doc["predictions"], _expected(predictor, digits_x[:3], top_k=2))
    assert refused == 400 and "body: not valid JSON" in json.loads(body)["error"]


def test_the_batched_counts_render_as_prometheus_clients_own_would(digits_run, tmp_path):
    """Each API server counts in memory and writes its counts to a file; /metrics sums the
    files. Two processes' counts, rendered, equal prometheus_client's own Histogram and
    Counter fed the same observations (bucket edges included: `le` holds its bound)."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from export.serve.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, Tally, metrics_text

    registry = CollectorRegistry()
    rows = Histogram("frozenfit_batch_rows", "x", buckets=BATCH_BUCKETS, registry=registry)
    seconds = Histogram("frozenfit_request_seconds", "x", buckets=LATENCY_BUCKETS,
                        registry=registry)
    requests = Counter("frozenfit_requests", "x", ["status"], registry=registry)
    observed = [(200, 0.0005, 1), (200, 0.003, 2), (422, 0.02, 0), (200, 12.0, 1024),
                (503, 0.001, 0), (200, 0.0004, 3000)]
    for i, part in enumerate((observed[:3], observed[3:])):
        tally = Tally()
        for status, s, n in part:
            tally.request(status, s, n)
            requests.labels(str(status)).inc()
            seconds.observe(s)
            if n:
                tally.batch(1, n, 0.001)
                rows.observe(n)
        (tmp_path / f"api-{i}.json").write_text(json.dumps({"tally": tally.state()}))
    (tmp_path / "api-7.json").write_text('{"tally": {"requests": ')  # half written: skipped
    (tmp_path / "api-8.json").write_text("[1, 2]")  # not ours: skipped
    ours = Server.parse(metrics_text(read_card(digits_run / "model.onnx"), tmp_path))
    theirs = Server.parse(generate_latest(registry).decode())
    for key, value in theirs.items():  # (_created: a single process's start time)
        if key.startswith(("frozenfit_batch_rows_", "frozenfit_request_seconds_",
                           "frozenfit_requests_total")) and "_created" not in key:
            assert ours[key] == pytest.approx(value), key
    assert ours['frozenfit_request_errors_total{status="422"}'] == 1
    assert 'frozenfit_request_errors_total{status="200"}' not in ours
    assert ours["frozenfit_instances_total"] == sum(n for _, _, n in observed)
    assert ours["frozenfit_model_swaps_total"] == 0 and ours["frozenfit_drift_rows"] == 0


BAD = {
    # name: (body, content type, query, status, words the error must contain)
    "not JSON": (b"{instances: ", "application/json", "", 400, ["body", "not valid JSON"]),
    "no instances": (b'{"rows": []}', "application/json", "", 422, ["instances"]),
    "empty instances": (b'{"instances": []}', "application/json", "", 422, ["non-empty"]),
    "not base64": (b'{"instances": ["%%%"]}', "application/json", "", 400,
                   ["instances[0]", "base64"]),
    "not an image": (json.dumps({"instances": [base64.b64encode(b"hello").decode()]}).encode(),
                     "application/json", "", 400, ["instances[0]", "cannot decode image"]),
    "wrong shape": (b'{"instances": [[1, 2, 3]]}', "application/json", "", 422,
                    ["instances[0]", "one instance of shape (1, 8, 8)", "got shape (3,)"]),
    "ragged": (b'{"instances": [[[1, 2], [3]]]}', "application/json", "", 422, ["ragged"]),
    "fractions for uint8": (json.dumps({"instances": [np.full((1, 8, 8), 0.5).tolist()]}).encode(),
                            "application/json", "", 422, ["instances[0]", "[0, 255]"]),
    "strings as pixels": (json.dumps({"instances": [[["a"] * 8] * 8]}).encode(),
                          "application/json", "", 422, ["instances[0]", "numbers"]),
    "an object": (b'{"instances": [{"a": 1}]}', "application/json", "", 422, ["instances[0]"]),
    "too many instances": (json.dumps({"instances": [[[0] * 8] * 8] * 65}).encode(),
                           "application/json", "", 413, ["instances", "at most 64"]),
    "body too large": (b"x" * 300_000, "application/json", "", 413, ["body", "bytes"]),
    "raw image that is not one": (b"GIF89a-not-really", "image/png", "", 400,
                                  ["body", "cannot decode image"]),
    "content type": (b"a,b\n1,2\n", "text/csv", "", 415, ["Content-Type text/csv"]),
    "top_k too large": (b'{"instances": [[[0]]]}', "application/json", "?top_k=11", 422, ["top_k"]),
    "top_k not a number": (b'{"instances": [[[0]]]}', "application/json", "?top_k=x", 422, ["top_k"]),
    "coverage out of range": (b'{"instances": [[[0]]]}', "application/json", "?coverage=1",
                              422, ["coverage 1.0", "between 0 and 1"]),
    "coverage not a number": (b'{"instances": [[[0]]]}', "application/json", "?coverage=most",
                              422, ["coverage most"]),
    "coverage beyond the rows": (b'{"instances": [[[0]]]}', "application/json",
                                 "?coverage=0.9999", 422, ["at most"]),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_requests_get_a_4xx_naming_the_field(image_server, name):
    body, content_type, query, want, words = BAD[name]
    status, raw, _ = image_server.request("POST", "/predict" + query, body, content_type)
    assert status == want, raw
    message = json.loads(raw)["error"]
    assert "\n" not in message and "Traceback" not in message
    for word in words:
        assert word in message, message


def test_hostile_requests_neither_crash_nor_grow_the_server(image_server, digits_x):
    def rss_mb() -> float:
        total = 0
        for pid in image_server.pids():
            try:
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * 4096
            except OSError:
                pass
        return total / 2**20

    bodies = [b for b, ct, q, *_ in BAD.values() if ct == "application/json"]
    for b in bodies * 5:  # warm-up: allocator pools, imported modules
        image_server.request("POST", "/predict", b)
    start = rss_mb()
    for b in bodies * 30:
        image_server.request("POST", "/predict", b)
    assert rss_mb() - start < 30, (start, rss_mb())
    status, doc = image_server.predict(digits_x[:2].tolist())
    assert status == 200 and len(doc["predictions"]) == 2


def _released_together(port: int, bodies: list[bytes]) -> list[tuple[int, dict]]:
    """POSTs `bodies` to /predict?top_k=2 on one connection each, every request sent but its
    last byte until all are in, then the last bytes back to back: the requests complete in
    the server within microseconds of each other, whatever the machine's speed (sent from
    threads, a fast server can answer each before the next arrives)."""
    socks = []
    try:
        for body in bodies:
            sock = socket.create_connection(("127.0.0.1", port), timeout=60)
            socks.append(sock)
            head = (f"POST /predict?top_k=2 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                    f"application/json\r\nContent-Length: {len(body)}\r\n"
                    f"Connection: close\r\n\r\n").encode()
            sock.sendall(head + body[:-1])
        time.sleep(0.3)  # every partial request read by the server
        for sock, body in zip(socks, bodies):
            sock.sendall(body[-1:])
        answers = []
        for sock in socks:
            resp = http.client.HTTPResponse(sock)
            resp.begin()
            answers.append((resp.status, json.loads(resp.read())))
        return answers
    finally:
        for sock in socks:
            sock.close()


def test_concurrent_requests_are_batched_without_mixing_rows(image_server, digits_run, digits_x):
    predictor = Predictor(digits_run / "model.onnx")
    before = image_server.metrics()
    rng = np.random.default_rng(0)
    jobs = [rng.choice(len(digits_x), size=int(rng.integers(1, 6)), replace=False)
            for _ in range(96)]
    answers = []
    for at in range(0, len(jobs), 24):  # four rounds of 24 requests arriving together
        answers += _released_together(image_server.port, [json.dumps(
            {"instances": digits_x[rows].tolist()}).encode() for rows in jobs[at:at + 24]])
    for rows, (status, doc) in zip(jobs, answers):
        assert status == 200, doc
        _close(doc["predictions"], _expected(predictor, digits_x[rows], top_k=2))
    after = image_server.metrics()
    calls = after["frozenfit_batch_requests_count"] - before["frozenfit_batch_requests_count"]
    stacked = after["frozenfit_batch_requests_sum"] - before["frozenfit_batch_requests_sum"]
    assert stacked == len(jobs)
    assert calls < len(jobs), "no two requests ever shared an onnxruntime call"


def test_table_model(tmp_path):
    from tests.test_batch_tables import _table_model

    model = _table_model(tmp_path)
    predictor = Predictor(model)
    rows = [{"a": 0.5, "b": -1.0, "c": 2.0, "key": "passed"}, {"a": -2.0, "b": 0.25, "c": 0.0}]
    x = np.array([[r["a"], r["b"], r["c"]] for r in rows], np.float32)
    server = Server(model, tmp_path)
    try:
        status, doc = server.predict(rows)
        assert status == 200, doc
        _close(doc["predictions"], _expected(predictor, x))
        status, doc = server.predict(x.tolist())
        _close(doc["predictions"], _expected(predictor, x))
        status, doc = server.predict([{"a": 1, "b": 2}])
        assert status == 422 and "missing feature 'c'" in doc["error"], doc
        status, doc = server.predict([{"a": 1, "b": "2", "c": 3}])
        assert status == 422 and "instances[0].b" in doc["error"], doc
        status, doc = server.predict([{"a": 1, "b": None, "c": 3}])
        assert status == 422 and "instances[0].b" in doc["error"], doc
        status, doc = server.predict([[1, 2]])
        assert status == 422 and "2 values, expected 3" in doc["error"], doc
        status, body, _ = server.request("POST", "/predict", b"\x89PNG", "image/png")
        assert status == 415 and b"table rows" in body
        # float32 rows on the inference protocol, JSON and binary, from Triton's client
        httpclient = pytest.importorskip("tritonclient.http")
        client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
        for binary in (False, True):
            inp = httpclient.InferInput(predictor.spec.name, list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            got = client.infer(model.stem, [inp]).as_numpy(predictor.card.outputs[0])
            want = predictor.predict(x)
            np.testing.assert_allclose(got, want.logits if want.values is None else want.values,
                                       atol=1e-6)
        client.close()
    finally:
        code, _, err = server.stop()
    assert code == 0, err


def test_sigterm_drains_in_flight_requests_and_a_full_queue_answers_503(
        digits_run, digits_x, tmp_path):
    # A graph that loops for seconds per call: the first request occupies the
    # worker, the next three wait for it, so all four are in flight when SIGTERM lands.
    slow = tmp_path / "slow.onnx"
    looping_model(digits_run, slow, trips=3 * 10 ** 6)
    server = Server(slow, tmp_path, "--max-queue", "4")
    answers = []

    def call(i):
        answers.append(server.predict(digits_x[i:i + 1].tolist()))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while server.metrics().get("frozenfit_requests_in_flight") != 4:
        assert time.monotonic() < deadline, "the four requests never got in flight"
    status, doc = server.predict(digits_x[:1].tolist())  # the fifth: over --max-queue 4
    assert status == 503 and "--max-queue" in doc["error"], doc
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    try:
        assert server.request("GET", "/health")[0] == 503
        assert server.predict(digits_x[:1].tolist())[0] == 503
    except OSError:
        pass  # or the listener is already closed: either way nothing new is accepted
    for t in threads:
        t.join(timeout=30)
    assert [s for s, _ in answers] == [200] * 4, answers
    code, _, err = server.stop()
    assert code == 0, err
    assert "Traceback" not in err, err
    assert "finishing 4 requests in flight" in err


def test_serve_needs_its_extra_and_refuses_bad_settings_in_one_line(digits_run, tmp_path):
    model = str(digits_run / "model.onnx")
    env = poisoned_env(tmp_path, ("uvicorn",))
    assert_one_line_error(run_cli("serve", "--model", model, env=env), "serve extra",
                          "pip install '.[serve]'")
    assert_one_line_error(run_cli("serve", "--model", str(tmp_path / "none.onnx")),
                          "not found (expected an ONNX model file)")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        assert_one_line_error(run_cli("serve", "--model", model, "--port", port),
                              f"--port {port}", "cannot listen")
    assert_one_line_error(run_cli("serve", "--model", model, "--port", "80"), "--port 80")
    assert_one_line_error(run_cli("serve", "--model", model, "--workers", "0"), "--workers")
    assert_one_line_error(run_cli("serve", "--model", model, "--poll-s", "5"), "--poll-s 5",
                          "models:/NAME@ALIAS", "reloads on SIGHUP")
    assert_one_line_error(run_cli("serve", "--model", model, "--poll-s", "-1"), "--poll-s -1")
    assert_one_line_error(run_cli("serve", "--model", model, "--poll-s", "nan"), "--poll-s nan",
                          "finite")
    for flag in ("--max-body-mb", "--batch-timeout-ms"):  # NaN passed every comparison
        assert_one_line_error(run_cli("serve", "--model", model, flag, "nan"), flag, "finite")
    assert_one_line_error(run_cli("serve", "--model", model, "--max-queue", "100000",
                                  "--max-body-mb", "100000"),
                          "--max-queue 100000 x --max-body-mb 100000", "half of the memory")
    assert_one_line_error(run_cli("serve", "--model", model, "--workers", "100000"),
                          "--workers 100000: at most", "each holds a session")
    # 64 images of 8x8 bytes each is small; 10 million of them in each of 50,000 requests is
    # 30 TB of decoded input, though each body alone stays under --max-body-mb
    assert_one_line_error(run_cli("serve", "--model", model, "--max-queue", "50000",
                                  "--max-instances", "10000000", "--max-body-mb", "0.001"),
                          "--max-queue 50000 x --max-instances 10000000", "decoded inputs")


def _batcher_run(max_requests, timeout, service_s, arrivals, fail=False):
    """Submit `arrivals` (seconds after start, one single-row request each) to a Batcher
    whose batches take `service_s`; returns the batches sent and each request's answer."""
    import asyncio

    from export.serve.batching import Batcher

    sent, sent_at = [], []

    async def send_batch(x, parts):
        sent.append([int(v) for v in x[:, 0]])
        sent_at.append(asyncio.get_running_loop().time())
        await asyncio.sleep(service_s)
        if fail:
            raise RuntimeError("worker gone")
        return [(200, str(int(v)).encode()) for v in x[:, 0]]

    async def main():
        batcher = Batcher(send_batch, max_requests, timeout, slots=1)
        start = asyncio.get_running_loop().time()

        async def one(i, at):
            await asyncio.sleep(at)
            try:
                status, body = await batcher.submit(np.array([[i]]), 1)
                return status, body.decode(), asyncio.get_running_loop().time() - start
            except RuntimeError as exc:
                return 500, str(exc), None
        return await asyncio.gather(*(one(i, at) for i, at in enumerate(arrivals)))

    answers = asyncio.run(main())
    return sent, [t - sent_at[0] for t in sent_at], answers


def test_batcher_gathers_while_a_batch_is_in_flight_and_answers_each_request_its_own():
    sent, _, answers = _batcher_run(4, 1.0, 0.2, [0] + [0.05] * 9)
    assert [len(b) for b in sent] == [1, 4, 4, 1]  # alone while idle, then full batches
    assert sorted(sum(sent, [])) == list(range(10))  # every request exactly once
    assert [(s, b) for s, b, _ in answers] == [(200, str(i)) for i in range(10)]


def test_batcher_runs_the_requests_of_one_loop_turn_as_one_batch_on_the_loop():
    """A batch small enough to run on the event loop returns its replies at once (no task,
    no thread); the requests read in the same turn of the loop leave together."""
    import asyncio

    from export.serve.batching import Batcher

    sent = []

    def send_batch(x, parts):
        sent.append([int(v) for v in x[:, 0]])
        return [(200, str(int(v)).encode()) for v in x[:, 0]]

    async def main():
        batcher = Batcher(send_batch, 4, 1.0, slots=1)
        first = await batcher.submit(np.array([[0]]), 1)
        return [first, *await asyncio.gather(
            *(batcher.submit(np.array([[i]]), 1) for i in range(1, 11)))]

    answers = asyncio.run(main())
    assert sent == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert answers == [(200, str(i).encode()) for i in range(11)]


def test_a_request_alone_in_its_process_runs_at_once_and_concurrent_ones_still_gather():
    """With `alone()` true (uvicorn has begun no other request in this process) and no batch
    in flight, a request is sent without waiting for a turn of the loop: its submit returns
    without suspending once. Requests begun together still leave as one batch."""
    import asyncio

    from export.serve.batching import Batcher

    sent, begun = [], set()

    def send_batch(x, parts):
        sent.append([int(v) for v in x[:, 0]])
        return [(200, str(int(v)).encode()) for v in x[:, 0]]

    async def main():
        batcher = Batcher(send_batch, 4, 1.0, slots=1, alone=lambda: len(begun) <= 1)
        begun.add(0)
        step = batcher.submit(np.array([[0]]), 1)
        try:
            step.send(None)
        except StopIteration as done:
            first = done.value
        else:
            raise AssertionError("a lone request waited for a turn of the event loop")
        begun.update(range(1, 4))  # three requests begun in one turn: they gather
        return [first, *await asyncio.gather(
            *(batcher.submit(np.array([[i]]), 1) for i in range(1, 4)))]

    answers = asyncio.run(main())
    assert sent == [[0], [1, 2, 3]]
    assert answers == [(200, str(i).encode()) for i in range(4)]


def test_batcher_waits_at_most_the_batch_timeout_and_fails_a_batch_together():
    # The worker is busy for 1 s; the second request leaves after the 50 ms timeout.
    sent, sent_at, _ = _batcher_run(64, 0.05, 1.0, [0, 0.01])
    assert sent == [[0], [1]] and sent_at[1] < 0.5  # not after the first came back (1 s)
    _, _, answers = _batcher_run(64, 0.05, 0.01, [0, 0.001, 0.002], fail=True)
    assert [a[:2] for a in answers] == [(500, "worker gone")] * 3


def _api_servers(server: Server) -> list[int]:
    return server.pids()[1:]  # the supervisor's children


def test_the_default_is_one_api_server_per_8_cores_and_one_on_cuda(image_server, monkeypatch):
    """The server started without --workers runs as many API servers as the rule gives for
    this machine's cores (here, in CI: one), and the rule itself at other core counts."""
    from export import timing
    from export.serve.options import auto_workers

    assert len(_api_servers(image_server)) == auto_workers(on_cuda=False)[0]
    for cores, servers in ((1, 1), (2, 1), (15, 1), (16, 2), (64, 8)):
        monkeypatch.setattr(timing, "usable_cores", lambda c=cores: c)
        assert auto_workers(on_cuda=False) == (
            servers, f"one API server per 8 of the {cores} usable cores")
        assert auto_workers(on_cuda=True) == (1, "one API server on CUDA")
        assert auto_workers(on_cuda=False, asked=3) == (3, "--workers")


def test_a_killed_api_server_is_replaced_and_no_request_hangs(digits_run, digits_x, tmp_path):
    server = Server(digits_run / "model.onnx", tmp_path, "--workers", "2")
    try:
        victim = _api_servers(server)[0]
        outcomes = []

        def call(i):
            try:
                outcomes.append(server.predict(digits_x[i % 50:i % 50 + 1].tolist())[0])
            except (OSError, http.client.IncompleteRead):
                # a connection the killed process held: closed, not hung (uvicorn writes a
                # response's head and body in two writes, so a kill can fall between them)
                outcomes.append("closed")

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(call, i) for i in range(400)]
            time.sleep(0.3)
            os.kill(victim, signal.SIGKILL)
            for f in futures:
                f.result(timeout=30)  # every request ends
        assert len(outcomes) == 400 and set(outcomes) <= {200, "closed"}, outcomes
        deadline = time.monotonic() + 30
        while len([p for p in _api_servers(server) if p != victim]) < 2:
            assert time.monotonic() < deadline, "the dead API server was not replaced"
            time.sleep(0.1)
        assert all(server.predict(digits_x[:1].tolist())[0] == 200 for _ in range(20))
    finally:
        code, _, err = server.stop()
    assert code == 0 and f"API server {victim} died (signal SIGKILL); starting another" in err


def _copy_with(src: Path, dest: Path, doc: str | None = None, classes=None) -> None:
    """The model at `src` as another file: the same graph with another doc string (so
    another SHA-256), or with its card's class names replaced."""
    import onnx

    model = onnx.load(str(src))
    model.doc_string = doc or model.doc_string
    if classes is not None:
        card = next(p for p in model.metadata_props if p.key == "frozenfit.card")
        doc_ = json.loads(card.value)
        doc_["class_names"] = classes
        card.value = json.dumps(doc_)
    onnx.save(model, str(dest))


def test_sighup_reloads_the_model_file_and_refuses_one_that_answers_otherwise(
        digits_run, digits_x, tmp_path):
    served = tmp_path / "served.onnx"
    _copy_with(digits_run / "model.onnx", served)
    first = hashlib.sha256(served.read_bytes()).hexdigest()
    server = Server(served, tmp_path)
    try:
        assert server.predict(digits_x[:1].tolist())[1]["model_sha256"] == first
        _copy_with(digits_run / "model.onnx", served, classes=[f"c{i}" for i in range(10)])
        server.proc.send_signal(signal.SIGHUP)
        time.sleep(2)  # refused: the old model still answers
        assert server.predict(digits_x[:1].tolist())[1]["model_sha256"] == first
        _copy_with(digits_run / "model.onnx", served, doc="retrained")
        second = hashlib.sha256(served.read_bytes()).hexdigest()
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while (sha := server.predict(digits_x[:1].tolist())[1]["model_sha256"]) != second:
            assert sha == first and time.monotonic() < deadline, sha
            time.sleep(0.1)
        assert json.loads(server.request("GET", "/card")[1])["class_names"] == [
            str(i) for i in range(10)]
    finally:
        code, _, err = server.stop()
    assert code == 0, err
    assert "not loaded: its class_names differs" in err and f"still serving sha256 {first[:12]}" in err
    assert f"now serving sha256 {second[:12]} (was {first[:12]})" in err
