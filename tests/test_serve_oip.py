"""`trainer serve` on the Open Inference Protocol, talked to by Triton's own HTTP client
(`tritonclient.http`, from PyPI): metadata, readiness, infer with JSON and with binary
tensors, the classification extension, conformal sets, and refusals naming the field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from export.conformal import set_mask, threshold
from export.runtime import Predictor
from tests.test_serve import Server

httpclient = pytest.importorskip("tritonclient.http",
                                 reason="tritonclient is a dev extra: pip install '.[dev]'")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def server(digits_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_oip")
    s = Server(digits_run / "model.onnx", tmp, "--name", "digits", "--max-instances", "64")
    yield s
    code, _, err = s.stop()
    assert code == 0, err


@pytest.fixture(scope="module")
def client(server):
    c = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    yield c
    c.close()


@pytest.fixture(scope="module")
def digits_x(digits_test_npz):
    with np.load(digits_test_npz) as npz:
        return npz["x"][:20]


def test_server_and_model_metadata_and_readiness(client, digits_run):
    card = Predictor(digits_run / "model.onnx").card
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits") and client.is_model_ready("digits", "1")
    assert not client.is_model_ready("other")
    meta = client.get_server_metadata()
    assert meta["name"] == "frozenfit" and "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata("digits")
    assert model["inputs"] == [{"name": card.input.name, "datatype": "UINT8",
                                "shape": [-1, *card.input.shape]}]
    assert [o["name"] for o in model["outputs"]] == ["logits", "probabilities"]


@pytest.mark.parametrize("binary", [True, False])
def test_infer_equals_the_predictor(client, digits_run, digits_x, binary):
    predictor = Predictor(digits_run / "model.onnx")
    want = predictor.predict(digits_x)
    inp = httpclient.InferInput(predictor.spec.name, list(digits_x.shape), "UINT8")
    inp.set_data_from_numpy(digits_x, binary_data=binary)
    outs = [httpclient.InferRequestedOutput(n, binary_data=binary)
            for n in ("logits", "probabilities")]
    result = client.infer("digits", [inp], outputs=outs, request_id="r1")
    np.testing.assert_allclose(result.as_numpy("logits"), want.logits, atol=1e-6)
    np.testing.assert_allclose(result.as_numpy("probabilities"), want.probabilities, atol=1e-6)
    response = result.get_response()
    assert response["model_name"] == "digits" and response["id"] == "r1"
    assert response["parameters"]["model_sha256"] == predictor.sha256


def test_classification_extension_and_conformal_sets(client, digits_run, digits_x):
    predictor = Predictor(digits_run / "model.onnx")
    want = predictor.predict(digits_x)
    inp = httpclient.InferInput(predictor.spec.name, list(digits_x.shape), "UINT8")
    inp.set_data_from_numpy(digits_x)
    out = httpclient.InferRequestedOutput("probabilities", class_count=3)
    top = client.infer("digits", [inp], outputs=[out]).as_numpy("probabilities")
    assert top.shape == (len(digits_x), 3)
    first = [s.decode().split(":") for s in top[:, 0]]
    assert [int(i) for _, i, _ in first] == want.labels.tolist()
    assert [label for _, _, label in first] == [predictor.class_names[i] for i in want.labels]
    np.testing.assert_allclose([float(v) for v, _, _ in first], want.confidence, atol=1e-5)
    result = client.infer("digits", [inp], parameters={"coverage": 0.9}, outputs=[
        httpclient.InferRequestedOutput("prediction_set", binary_data=False),
        httpclient.InferRequestedOutput("set_size", binary_data=True)])
    mask = set_mask(want.probabilities, threshold(predictor.card.calibration, 0.9, "m"))
    assert result.as_numpy("set_size").tolist() == mask.sum(1).tolist()
    sets = [s.decode() if isinstance(s, bytes) else s for s in result.as_numpy("prediction_set")]
    assert [len(s.split("|")) if s else 0 for s in sets] == mask.sum(1).tolist()


def test_refusals_raise_the_clients_exception_naming_the_field(client, server, digits_run,
                                                                digits_x):
    name = Predictor(digits_run / "model.onnx").spec.name

    def infer(x, datatype="UINT8", model="digits", input_name=name, **kw):
        inp = httpclient.InferInput(input_name, list(x.shape), datatype)
        inp.set_data_from_numpy(x)
        with pytest.raises(InferenceServerException) as exc:
            client.infer(model, [inp], **kw)
        return str(exc.value)

    assert "inputs[0]" in infer(digits_x[:, :, :4])  # wrong shape
    assert "datatype" in infer(digits_x.astype(np.float32), "FP32")
    assert "digits" in infer(digits_x, model="other")
    assert "inputs[0].name" in infer(digits_x, input_name="pixels")
    assert "parameters.coverage" in infer(digits_x, parameters={"coverage": 1.5})
    assert "outputs[0].name" in infer(digits_x, outputs=[
        httpclient.InferRequestedOutput("values")])
    status, body, _ = server.request("POST", "/v2/models/digits/infer", b"{not json")
    assert status == 400 and "not JSON" in json.loads(body)["error"]
    status, body, _ = server.request("POST", "/v2/models/digits/infer", json.dumps(
        {"inputs": [{"name": name, "datatype": "UINT8", "shape": [1, 1, 8, 8],
                     "data": [300] * 64}]}).encode())
    assert status == 422 and "[0, 255]" in json.loads(body)["error"]
    one = {"name": name, "datatype": "UINT8", "shape": [1, 1, 8, 8], "data": [0] * 64}
    hostile = {  # request -> (status, words in the error)
        json.dumps({"inputs": [one], "parameters": [1]}): (422, "parameters: expected"),
        json.dumps({"inputs": [one], "outputs": "logits"}): (422, "outputs: expected a list"),
        json.dumps({"inputs": [{**one, "shape": [0, 1, 8, 8], "data": []}]}): (422, "no rows"),
        json.dumps({"inputs": [one], "outputs": [{"name": "probabilities", "parameters":
                                                  {"classification": True}}]}):
            (422, "classification"),
        json.dumps({"inputs": [{**one, "parameters": {"binary_data_size": "64"}}]}):
            (400, "binary_data_size"),
        json.dumps({"inputs": [{**one, "parameters": "x"}]}): (422, "inputs[0].parameters"),
        json.dumps({"inputs": [{**one, "shape": [10 ** 12, 1, 8, 8]}]}): (413, "at most"),
        json.dumps([one]): (400, "not a JSON object"),
        # numpy alone takes "1" and true as 1: the protocol's data are numbers, as /predict's
        json.dumps({"inputs": [{**one, "data": ["1"] * 64}]}): (422, "got non-numbers"),
        json.dumps({"inputs": [{**one, "data": [True] * 64}]}): (422, "got booleans"),
        json.dumps({"inputs": [{**one, "data": [None] * 64}]}): (422, "inputs[0].data"),
        json.dumps({"inputs": [{**one, "data": [[0] * 60, [0] * 4]}]}): (422, "ragged"),
        json.dumps({"id": {"x": 1}, "inputs": [one]}): (422, "id: expected a string"),
        json.dumps({"inputs": [one], "parameters": {"binary_data_output": "false"}}):
            (422, "binary_data_output: expected true or false"),
        json.dumps({"inputs": [one], "outputs": [{"name": "logits", "parameters":
                                                  {"binary_data": 1}}]}):
            (422, "outputs[0].parameters.binary_data"),
    }
    for request, (want, words) in hostile.items():
        status, body, _ = server.request("POST", "/v2/models/digits/infer", request.encode())
        assert status == want and words in json.loads(body)["error"], (request, body)
    assert server.request("GET", "/v2/models/digits/infer")[0] == 405
    assert server.request("GET", "/v2/nothing")[0] == 404
    assert server.predict(digits_x[:2].tolist())[0] == 200  # /predict still answers


KEY = "k3y-" + "0123456789abcdef" * 2


def test_an_api_key_guards_every_route_but_the_health_checks(digits_run, digits_x, tmp_path):
    (tmp_path / "key.txt").write_text(KEY + "\n")
    s = Server(digits_run / "model.onnx", tmp_path, "--api-key-file", str(tmp_path / "key.txt"))
    try:
        body = json.dumps({"instances": digits_x[:2].tolist()}).encode()
        routes = [("POST", "/predict", body), ("GET", "/card", None), ("GET", "/metrics", None),
                  ("GET", "/v2", None), ("GET", "/v2/models/model", None)]
        for method, path, data in routes:
            for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": f"Basic {KEY}"},
                            {"Authorization": "Bearer " + KEY[:-1]}):
                status, reply = _raw(s, method, path, data, headers)
                assert status == 401 and b"API key" in reply, (path, headers, status)
            for headers in ({"X-API-Key": KEY}, {"Authorization": f"Bearer {KEY}"}):
                assert _raw(s, method, path, data, headers)[0] == 200, (path, headers)
        for path in ("/health", "/v2/health/live", "/v2/health/ready"):
            assert _raw(s, "GET", path, None, {})[0] == 200, path
        client = httpclient.InferenceServerClient(f"127.0.0.1:{s.port}")
        inp = httpclient.InferInput("image", list(digits_x.shape), "UINT8")
        inp.set_data_from_numpy(digits_x)
        with pytest.raises(InferenceServerException, match="API key"):
            client.infer("model", [inp])
        assert client.infer("model", [inp], headers={"X-API-Key": KEY}).as_numpy(
            "logits").shape == (len(digits_x), 10)
        client.close()
        metrics = _raw(s, "GET", "/metrics", None, {"X-API-Key": KEY})[1]
    finally:
        code, out, err = s.stop()
    assert code == 0, err
    assert KEY not in out + err and KEY.encode() not in metrics


def _raw(server, method, path, body, headers):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request(method, path, body, {"Content-Type": "application/json", **headers})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_key_files_that_are_not_one_key_are_one_line(tmp_path, monkeypatch):
    import os

    from export.errors import InputError
    from export.serve.options import key_warning, read_api_key

    cases = {"empty": b"", "short": b"abc\n", "huge": b"x" * 10_000}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InputError, match=name):
            read_api_key(str(tmp_path / name))
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(InputError, match="fifo"):
        read_api_key(str(tmp_path / "fifo"))  # refused before it is opened: no hang
    with pytest.raises(InputError, match="not found"):
        read_api_key(str(tmp_path / "missing"))
    monkeypatch.setenv("FROZENFIT_API_KEY", f"  {KEY}  ")
    assert read_api_key(None) == KEY
    monkeypatch.delenv("FROZENFIT_API_KEY")
    assert read_api_key(None) is None
    assert "without an API key" in key_warning("0.0.0.0", None)
    assert key_warning("0.0.0.0", KEY) is None and key_warning("127.0.0.1", None) is None
