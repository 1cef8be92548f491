"""The Open Inference Protocol (KServe V2, REST) beside `/predict`: what Triton's and
KServe's clients (`tritonclient.http`, `perf_analyzer`) speak. Torch-free.

Routes: `GET /v2` (server metadata), `/v2/health/live`, `/v2/health/ready`,
`/v2/models/{name}[/versions/{v}]` (model metadata from the card),
`.../ready`, and `POST .../infer`: JSON tensors, or the binary tensor data extension
(`Inference-Header-Content-Length`: the JSON header's size, raw little-endian tensors after
it, `binary_data_size` per input, `binary_data` / `binary_data_output` for outputs), and the
classification extension (`parameters.classification: k` on an output: its k best as
`value:index:label` strings). `parameters.coverage` on the request adds the conformal
outputs `prediction_set` (BYTES, class names joined by |) and `set_size` (INT32). The input
goes through the same check as every other path (export/runtime.check_input); a bad
request is `{"error": "..."}` with a 4xx naming the field.
"""

from __future__ import annotations

import math
import re
import struct

import numpy as np

from export.card import Card
from export.conformal import set_columns, threshold
from export.errors import InputError
from export.runtime import Prediction, check_input
from export.serve.payloads import RequestError, dumps, loads, numbers

DATATYPES = {"uint8": "UINT8", "float32": "FP32", "float16": "FP16", "int32": "INT32",
             "float64": "FP64", "int64": "INT64"}
ROUTE = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer)?$")
CONFORMAL_OUTPUTS = ("prediction_set", "set_size")


def route(path: str):
    """(what, model name, version) of a /v2 path, or None when it is not one."""
    if path == "/v2":
        return "server", None, None
    if path in ("/v2/health/live", "/v2/health/ready"):
        return path.rsplit("/", 1)[1], None, None
    m = ROUTE.match(path)
    if m is None:
        return None
    return (m.group(3) or "/metadata")[1:], m.group(1), m.group(2)


def server_metadata() -> dict:
    import importlib.metadata as md

    try:
        version = md.version("frozenfit")
    except md.PackageNotFoundError:  # run from a checkout without installing
        version = "unknown"
    return {"name": "frozenfit", "version": version,
            "extensions": ["classification", "binary_tensor_data"]}


def model_metadata(card: Card, name: str, version: str) -> dict:
    spec = card.input
    outputs = [{"name": o, "datatype": "FP32",
                "shape": [-1] if o == "values" else [-1, len(card.class_names)]}
               for o in card.outputs]
    return {"name": name, "versions": [version], "platform": "onnxruntime_onnx",
            "inputs": [{"name": spec.name, "datatype": DATATYPES[spec.dtype],
                        "shape": [-1, *spec.shape]}], "outputs": outputs}


def _fail(status: int, message: str):
    raise RequestError(status, message)


def _params(obj: dict, where: str) -> dict:
    """`obj`'s `parameters`: an object, or none."""
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        _fail(422, f"{where}parameters: expected an object")
    return params


def _flag(params: dict, key: str, where: str) -> bool | None:
    """A true/false parameter (binary_data, binary_data_output), or None when absent: a
    string such as "false" is refused, not taken as true."""
    value = params.get(key)
    if value is not None and not isinstance(value, bool):
        _fail(422, f"{where}parameters.{key}: expected true or false, got {value!r:.40}")
    return value


def _json_header(body: bytes, header_length: bytes | None) -> tuple[dict, bytes]:
    size = len(body)
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            size = -1
        if not 0 <= size <= len(body):
            _fail(400, f"Inference-Header-Content-Length: expected a size from 0 to "
                       f"{len(body)}, got {header_length.decode('latin-1')[:20]!r}")
    try:
        doc = loads(body[:size])
    except (ValueError, UnicodeDecodeError):
        _fail(400, "body: the inference request header is not JSON")
    if not isinstance(doc, dict):
        _fail(400, "body: the inference request is not a JSON object")
    return doc, body[size:]


def parse_infer(body: bytes, header_length: bytes | None, card: Card, limits) -> tuple:
    """(checked input array, what the response holds) of an infer request."""
    doc, binary = _json_header(body, header_length)
    spec, inputs = card.input, doc.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        _fail(422, f"inputs: expected a list of one tensor, {spec.name!r}")
    inp = inputs[0]
    if inp.get("name") != spec.name:
        _fail(422, f"inputs[0].name: {inp.get('name')!r}; this model's input is {spec.name!r}")
    if inp.get("datatype") != DATATYPES[spec.dtype]:
        _fail(422, f"inputs[0].datatype: {inp.get('datatype')!r}; expected "
                   f"{DATATYPES[spec.dtype]}")
    shape = inp.get("shape")
    if not (isinstance(shape, list) and shape and all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        _fail(422, "inputs[0].shape: expected a list of sizes")
    if shape[0] == 0:
        _fail(422, "inputs[0].shape: no rows")
    if shape[0] > limits.max_instances:
        _fail(413, f"inputs[0].shape: {shape[0]:,} rows; at most {limits.max_instances:,} "
                   f"(--max-instances)")
    x = _tensor(inp, shape, spec.dtype, binary)
    try:
        x = check_input(spec, x, "inputs[0]")
    except InputError as exc:
        _fail(422, str(exc))
    return x, _response_spec(doc, card)


def _tensor(inp: dict, shape: list, dtype: str, binary: bytes) -> np.ndarray:
    count, want = math.prod(shape), np.dtype(dtype)
    size = _params(inp, "inputs[0].").get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool):
            _fail(400, "inputs[0].parameters.binary_data_size: expected a number of bytes")
        if size != count * want.itemsize or size > len(binary):
            _fail(400, f"inputs[0].parameters.binary_data_size: {size}; a {dtype} tensor of "
                       f"shape {shape} is {count * want.itemsize} bytes "
                       f"({len(binary)} sent after the header)")
        return np.frombuffer(binary[:size], want.newbyteorder("<")).reshape(shape)
    flat = numbers(inp.get("data"), dtype, "inputs[0].data",
                   f"a list of {DATATYPES[dtype]} values").ravel()
    if flat.size != count:
        _fail(422, f"inputs[0].data: {flat.size} values for shape {shape} ({count})")
    return flat.reshape(shape)


def _response_spec(doc: dict, card: Card) -> dict:
    params = _params(doc, "")
    qhat = None
    if "coverage" in params:
        try:
            qhat = threshold(card.calibration, params["coverage"], "the model",
                             name="parameters.coverage")
        except InputError as exc:
            _fail(422, str(exc))
    known = (*card.outputs, *(CONFORMAL_OUTPUTS if qhat is not None else ()))
    outputs = doc.get("outputs") or [{"name": n} for n in known]
    if not isinstance(outputs, list):
        _fail(422, "outputs: expected a list of requested outputs")
    for i, o in enumerate(outputs):
        if not isinstance(o, dict) or o.get("name") not in known:
            _fail(422, f"outputs[{i}].name: {o.get('name') if isinstance(o, dict) else o!r};"
                       f" this model returns {', '.join(known)}")
        wanted = _params(o, f"outputs[{i}].")
        _flag(wanted, "binary_data", f"outputs[{i}].")
        k = wanted.get("classification")
        if k is not None and (card.regression or not isinstance(k, int) or isinstance(k, bool) or
                              not 1 <= k <= len(card.class_names)):
            _fail(422, f"outputs[{i}].parameters.classification: expected 1 to "
                       f"{len(card.class_names)} classes, got {k!r}" if not card.regression
                  else f"outputs[{i}].parameters.classification: this model is a regressor")
    if not isinstance(doc.get("id", ""), str):
        _fail(422, "id: expected a string (the protocol's request id)")
    return {"id": doc.get("id"), "outputs": outputs, "qhat": qhat,
            "binary": bool(_flag(params, "binary_data_output", ""))}


def _bytes_tensor(strings: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(s.encode())) + s.encode() for s in strings)


def _output(name: str, pred: Prediction, k: int | None, card: Card, qhat):
    """(datatype, shape, values as a list, raw bytes) of one requested output."""
    if name in CONFORMAL_OUTPUTS:  # the columns trainer predict writes
        values = set_columns(pred.probabilities, qhat, card.class_names)[name]
        if name == "set_size":
            return "INT32", [len(values)], values, np.asarray(values, "<i4").tobytes()
        return "BYTES", [len(values)], values, _bytes_tensor(values)
    arr = getattr(pred, name)
    if k:
        top = np.argsort(-arr, axis=1, kind="stable")[:, :k]
        strings = [f"{arr[i, j]:f}:{j}:{card.class_names[j]}" for i, row in enumerate(top)
                   for j in row]
        return "BYTES", [len(arr), k], strings, _bytes_tensor(strings)
    return (DATATYPES[str(arr.dtype)], list(arr.shape), arr.ravel().tolist(),
            arr.astype(arr.dtype.newbyteorder("<")).tobytes())


def encode_infer(pred: Prediction, request: dict, card: Card, name: str, version: str,
                 sha256: str) -> tuple[bytes, str, list]:
    """(body, content type, extra headers) of the infer response."""
    outputs, blobs = [], []
    for o in request["outputs"]:
        params = o.get("parameters") or {}  # checked by parse_infer
        datatype, shape, values, raw = _output(o["name"], pred, params.get("classification"),
                                               card, request["qhat"])
        entry = {"name": o["name"], "datatype": datatype, "shape": shape}
        if params.get("binary_data", request["binary"]):
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = values
        outputs.append(entry)
    doc = {"model_name": name, "model_version": version, "outputs": outputs,
           "parameters": {"model_sha256": sha256}}
    if request["id"] is not None:
        doc["id"] = request["id"]
    head = dumps(doc)
    if not blobs:
        return head, "application/json", []
    return (head + b"".join(blobs), "application/octet-stream",
            [(b"inference-header-content-length", str(len(head)).encode())])
