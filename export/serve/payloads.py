"""What `trainer serve` reads and writes: a request body checked against the model card
(JSON instances or one raw image, bounded by `Limits`) becomes an input array or a
`RequestError` naming the field; a prediction becomes one dict per row with the columns
`trainer predict` writes. No torch, no server: the API servers and workers both use it."""

from __future__ import annotations

import base64
import binascii
import json
from urllib.parse import parse_qs

import numpy as np

from export.card import Card, InputSpec
from export.conformal import threshold
from export.errors import InputError
from export.records import load_json
from export.runtime import Prediction, check_input, describe_input
from export.serve.options import Limits

IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg")

try:  # the serve extra's JSON library: it parses a JSON pixel list ~4x and writes a reply
    # ~10x faster than the standard library, which was a third of a small request's CPU
    from orjson import dumps, loads
except ModuleNotFoundError:  # the same documents, slower
    loads = load_json  # json.loads, too deep a document a ValueError as orjson's is

    def dumps(doc) -> bytes:
        return json.dumps(doc).encode()
INLINE_PARSE_BYTES = 64 << 10  # larger bodies are decoded off the event loop


class RequestError(Exception):
    """A request the server refuses: HTTP status and one line naming the field."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


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


def numbers(data, dtype: str, where: str, expected: str) -> np.ndarray:
    """`data` from JSON (a number or a nested list of them) as an array of `dtype`, for
    /predict and the inference protocol alike: a ragged list, booleans, strings and nulls
    are refused naming `where` (numpy would take "1" or true as 1), and for a uint8 input
    the values must be whole numbers in [0, 255]. `expected`: what the input is."""
    try:
        arr = np.asarray(data)
    except ValueError:  # ragged nesting
        raise RequestError(422, f"{where}: expected {expected}; got a ragged nested "
                                "list") from None
    if arr.dtype.kind not in "iuf":
        raise RequestError(422, f"{where}: expected numbers ({expected}), got "
                                f"{arr.dtype.kind == 'b' and 'booleans' or 'non-numbers'}")
    if np.dtype(dtype) == np.uint8:
        whole = arr.dtype.kind in "iu" or (np.isfinite(arr).all() and (arr == np.round(arr)).all())
        if not (whole and arr.min(initial=0) >= 0 and arr.max(initial=0) <= 255):
            raise RequestError(422, f"{where}: expected integers in [0, 255] for the model's "
                                    "uint8 input")
    return arr.astype(dtype)


def _raw_image_array(inst: list, spec: InputSpec, where: str) -> np.ndarray:
    """A nested list of pixel values: integers in [0, 255] for a uint8 graph."""
    arr = numbers(inst, spec.dtype, where, f"{describe_input(spec)} per instance")
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
        doc = loads(body)
    except ValueError as exc:
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


def parse_query(query: str, card: Card) -> tuple[int, float | None]:
    """The request's top_k and, for `coverage`, its conformal threshold."""
    if not query:  # most requests: the defaults, without parse_qs
        return 1, None
    fields = parse_qs(query)
    return _top_k(fields.get("top_k"), card), _threshold(fields.get("coverage"), card)


def _threshold(values: list[str] | None, card: Card) -> float | None:
    if not values:
        return None
    try:
        coverage = float(values[-1])
    except ValueError:
        coverage = values[-1]
    try:
        return threshold(card.calibration, coverage, "the model", name="coverage")
    except InputError as exc:
        raise RequestError(422, str(exc)) from None


def _top_k(values: list[str] | None, card: Card) -> int:
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


def rows_of(pred: Prediction, a: int, b: int) -> Prediction:
    if a == 0 and b == len(pred.labels if pred.labels is not None else pred.values):
        return pred  # the whole batch is one request's
    return Prediction(*(None if v is None else v[a:b] for v in
                        (pred.labels, pred.probabilities, pred.logits, pred.values)))


def encode_rows(pred: Prediction, class_names: list[str], top_k: int,
                qhat: float | None = None) -> list[dict]:
    """One dict per row with the columns `trainer predict` writes (export/batch.py)."""
    from export.batch import output_columns

    cols = output_columns(pred, None, class_names, top_k, qhat)
    return [{k: v[i] for k, v in cols.items()} for i in range(len(next(iter(cols.values()))))]
