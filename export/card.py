"""The model card: what a frozen model knows about itself, stored in ONNX `metadata_props`.

Pure Python (json + onnx protobuf access only), so the deploy side can read it without torch.
The card is one JSON document under the key `CARD_KEY`; `CARD_VERSION` is bumped whenever a
field changes meaning, and readers refuse versions they do not know.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from export.errors import InputError, require_file

CARD_KEY = "frozenfit.card"
CARD_VERSION = 2  # 2: training.epochs split into run_epochs and weights_epoch
READABLE_VERSIONS = (1, 2)
REQUIRED_FIELDS = ("task", "class_names", "input", "outputs", "dataset")


def attach_card(model_proto: Any, card: dict) -> None:
    """Store `card` in an `onnx.ModelProto`'s metadata, replacing any earlier card."""
    card = {"card_version": CARD_VERSION, **card}
    missing = [f for f in REQUIRED_FIELDS if f not in card]
    if missing:
        raise ValueError(f"model card is missing fields {missing}")
    for prop in list(model_proto.metadata_props):
        if prop.key == CARD_KEY:
            model_proto.metadata_props.remove(prop)
    entry = model_proto.metadata_props.add()
    entry.key = CARD_KEY
    entry.value = json.dumps(jsonable(card), sort_keys=True, allow_nan=False)


def jsonable(value: Any) -> Any:
    """`value` with every non-finite float replaced by None: strict JSON, which has no
    Infinity or NaN (older cards stored an INT8 parity tolerance of Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def parse_card(metadata: dict[str, str], source: str) -> dict:
    """Decode and validate the card from an ONNX metadata map; `source` names the file."""
    if CARD_KEY not in metadata:
        raise InputError(f"{source}: ONNX model has no '{CARD_KEY}' model card; "
                         "export it with `trainer export`")
    try:
        card = json.loads(metadata[CARD_KEY])
    except json.JSONDecodeError as exc:
        raise InputError(f"{source}: model card is not valid JSON ({exc})") from None
    if not isinstance(card, dict):
        raise InputError(f"{source}: model card is not a JSON object")
    version = card.get("card_version")
    if version not in READABLE_VERSIONS:
        raise InputError(f"{source}: model card version {version!r} is not supported "
                         f"(this runtime reads versions {', '.join(map(str, READABLE_VERSIONS))})")
    validate_card(card, source)
    return card


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _has_numbers(v, *keys) -> bool:
    return isinstance(v, dict) and all(_is_num(v.get(k)) for k in keys)


def _is_list(kind):
    return lambda v: isinstance(v, list) and all(kind(x) for x in v)


_is_str = lambda v: isinstance(v, str)  # noqa: E731
_is_dims = lambda v: _is_list(lambda d: isinstance(d, int) and d > 0)(v) and len(v) > 0  # noqa: E731
# field -> (check, what was expected); optional fields are checked when present.
SCHEMA = {
    "task": (lambda v: v in ("classification", "regression"), "classification or regression"),
    "class_names": (_is_list(_is_str), "a list of class names"),
    "outputs": (_is_list(_is_str), "a list of output names"),
    "input": (lambda v: isinstance(v, dict), "an object"),
    "input.name": (_is_str, "the graph's input name"),
    "input.kind": (lambda v: v in ("image", "tabular"), "image or tabular"),
    "input.dtype": (lambda v: v in ("uint8", "float32"), "uint8 or float32"),
    "input.shape": (_is_dims, "a list of positive sizes"),
    "input.value_range": (lambda v: _is_list(_is_num)(v) and len(v) == 2, "[low, high]"),
    "dataset": (lambda v: isinstance(v, dict), "an object"),
    "dataset.name": (_is_str, "a name"),
    "dataset.fingerprint": (_is_str, "a SHA-256 hex string"),
}
OPTIONAL = {
    "input.layout": (_is_str, "a layout such as NCHW"),
    "input.color_mode": (lambda v: v in ("L", "RGB"), "L or RGB"),
    "input.columns": (_is_list(_is_str), "a list of column names"),
    "dataset.split_sizes": (lambda v: isinstance(v, dict), "an object"),
    "metrics": (lambda v: isinstance(v, dict) and all(_is_num(x) for x in v.values()),
                "an object of numbers"),
    "parity": (lambda v: _has_numbers(v, "samples", "max_abs_diff", "top1_agreement"),
               "an object with samples, max_abs_diff, top1_agreement"),
    "quantization": (lambda v: _has_numbers(v, "val_accuracy_fp32", "val_accuracy_int8",
                                            "drop_points", "max_drop_points", "val_samples"),
                     "an object with the INT8 accuracies"),
    "consistency": (lambda v: isinstance(v, dict) and (
        not v.get("checked") or (_has_numbers(v, "graph", "recorded", "rows")
                                 and _is_str(v.get("metric")))),
                    "an object with checked, metric, graph, recorded, rows"),
    "training": (lambda v: isinstance(v, dict), "an object"),
    "versions": (lambda v: isinstance(v, dict), "an object"),
    "drift_reference": (lambda v: isinstance(v, dict) and isinstance(v.get("rows"), int)
                        and isinstance(v.get("continuous"), list), "an object with rows and checks"),
}


def _field(card: dict, dotted: str):
    value = card
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return KeyError
        value = value[key]
    return value


def validate_card(card: dict, source: str) -> None:
    """Types and required fields of the card, and its internal agreement (one line naming
    the field otherwise)."""
    for dotted, (check, expected) in {**SCHEMA, **OPTIONAL}.items():
        value = _field(card, dotted)
        if value is KeyError and dotted in OPTIONAL:
            continue
        if value is KeyError or not check(value):
            got = "missing" if value is KeyError else f"{json.dumps(value)[:60]}"
            raise InputError(f"{source}: model card field {dotted!r} is {got}; expected {expected}")
    task, spec = card["task"], card["input"]
    if task == "classification" and not card["class_names"]:
        raise InputError(f"{source}: model card field 'class_names' is empty for a classifier")
    want = {"classification": ["logits", "probabilities"], "regression": ["values"]}[task]
    if card["outputs"] != want:
        raise InputError(f"{source}: model card field 'outputs' is {card['outputs']}; a {task} "
                         f"model has {want}")
    if spec["kind"] == "image" and (len(spec["shape"]) != 3 or spec["shape"][0] not in (1, 3)):
        raise InputError(f"{source}: model card field 'input.shape' is {spec['shape']}; an image "
                         f"model takes [channels (1 or 3), height, width]")
    if spec["kind"] == "tabular" and "columns" in spec and [len(spec["columns"])] != spec["shape"]:
        raise InputError(f"{source}: model card field 'input.columns' names "
                         f"{len(spec['columns'])} columns but 'input.shape' is {spec['shape']}")


def check_graph(card: dict, inputs: list[tuple[str, str, list]], outputs: dict[str, list],
                source: str) -> None:
    """The card must describe the graph it is attached to: input name, dtype and shape,
    output names, and as many logits as classes. `inputs`: (name, numpy dtype name,
    shape with None or a name for dynamic axes); `outputs`: name -> shape."""
    spec = card["input"]
    if len(inputs) != 1:
        raise InputError(f"{source}: the graph has {len(inputs)} inputs; the card describes one")
    name, dtype, shape = inputs[0]
    if name != spec["name"]:
        raise InputError(f"{source}: model card field 'input.name' is {spec['name']!r} but the "
                         f"graph's input is {name!r}")
    if dtype != spec["dtype"]:
        raise InputError(f"{source}: model card field 'input.dtype' is {spec['dtype']} but the "
                         f"graph takes {dtype}")
    static = [d if isinstance(d, int) else None for d in shape[1:]]
    if len(static) != len(spec["shape"]) or any(
            d is not None and d != want for d, want in zip(static, spec["shape"])):
        raise InputError(f"{source}: model card field 'input.shape' is {spec['shape']} but the "
                         f"graph takes {list(shape)}")
    missing = [o for o in card["outputs"] if o not in outputs]
    if missing:
        raise InputError(f"{source}: model card output {missing[0]!r} is not an output of the "
                         f"graph ({sorted(outputs)})")
    width = outputs.get("logits", [None, None])[-1] if card["task"] == "classification" else None
    if isinstance(width, int) and width != len(card["class_names"]):
        raise InputError(f"{source}: model card field 'class_names' has {len(card['class_names'])} "
                         f"classes but the graph's logits have {width}")


def graph_signature(model: Any) -> tuple[list, dict]:
    """check_graph's (inputs, outputs) from an onnx.ModelProto."""
    from onnx import helper

    def dims(value_info):
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in value_info.type.tensor_type.shape.dim]

    def dtype(value_info):
        return helper.tensor_dtype_to_np_dtype(value_info.type.tensor_type.elem_type).name

    initializers = {i.name for i in model.graph.initializer}
    inputs = [(v.name, dtype(v), dims(v)) for v in model.graph.input if v.name not in initializers]
    return inputs, {v.name: dims(v) for v in model.graph.output}


def read_card(path: str | Path) -> dict:
    """Read the card of an ONNX file without loading its weights into a session."""
    import onnx  # deploy-side dependency; imported late to keep `trainer --help` fast

    path = Path(path)
    require_file(path, "an ONNX model file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and others for non-ONNX bytes
        raise InputError(f"{path}: not an ONNX model ({type(exc).__name__})") from None
    card = parse_card({p.key: p.value for p in model.metadata_props}, str(path))
    check_graph(card, *graph_signature(model), str(path))
    return card


def format_card(card: dict) -> str:
    """A readable summary for `trainer inspect`."""
    spec, data = card["input"], card["dataset"]
    lines = [f"task:        {card['task']}"]
    if card["task"] != "regression":
        lines.append(f"classes:     {len(card['class_names'])}: {', '.join(card['class_names'])}")
    lo, hi = spec["value_range"]
    splits = data.get("split_sizes")
    lines += [
        f"input:       {spec['name']} {spec['dtype']} {spec.get('layout', '')} "
        f"shape [N, {', '.join(map(str, spec['shape']))}] values in [{lo:g}, {hi:g}]",
    ]
    if spec.get("columns"):
        lines.append(f"features:    {', '.join(spec['columns'])}")
    lines += [
        f"outputs:     {', '.join(card['outputs'])}",
        f"precision:   {card.get('precision', 'fp32')}",
        f"dataset:     {data['name']} fingerprint {data['fingerprint'][:16]}... splits "
        + (", ".join(f"{k} {v:,}" for k, v in splits.items()) if splits else "unknown"),
    ]
    if card.get("metrics"):
        lines.append("metrics:     " + ", ".join(
            f"{k}={int(v)}" if float(v).is_integer() and "samples" in k else f"{k}={v:.4f}"
            for k, v in card["metrics"].items()))
    lines += gate_lines(card)
    if card.get("drift_reference"):
        from export.drift import small_reference

        lines.append(f"drift ref:   {card['drift_reference']['rows']} validation rows"
                     + (f": {note}" if (note := small_reference(card)) else ""))
    if card.get("training"):
        t = card["training"]
        epochs = (f"{t['run_epochs']} epochs, exported weights from epoch {t['weights_epoch']}"
                  if "run_epochs" in t else f"{t.get('epochs')} epochs")
        lines.append(f"training:    {epochs}, seed {t.get('seed')}, "
                     f"checkpoint sha256 {t.get('checkpoint_sha256', '')[:16]}...")
    if card.get("versions"):
        lines.append("versions:    " + ", ".join(f"{k} {v}" for k, v in card["versions"].items()))
    if card.get("created"):
        lines.append(f"created:     {card['created']}")
    return "\n".join(lines)


def gate_lines(card: dict) -> list[str]:
    """What the export checked: the graph against its own recorded metric, then against
    torch output by output (fp32/fp16) or by accuracy (INT8)."""
    lines = []
    c = card.get("consistency") or {}
    if c.get("checked"):
        lines.append(f"consistent:  graph {c['metric']}={c['graph']:.4f}, recorded {c['recorded']:.4f} "
                     f"on {c['rows']} validation rows")
    b = card.get("baseline") or {}
    if b.get("checked"):
        lines.append(f"baseline:    graph {b['metric']}={b['model']:.4f}, always answering "
                     f"{b['constant_answer']} {b['constant']:.4f}"
                     + ("" if b["better"] else " (NO BETTER: exported with --allow-trivial)"))
    q, p = card.get("quantization"), card.get("parity")
    if q:
        lines.append(f"int8 gate:   validation accuracy {q['val_accuracy_int8']:.4f} vs fp32 "
                     f"{q['val_accuracy_fp32']:.4f} ({q['drop_points']:+.2f} points, max "
                     f"{q['max_drop_points']:g}) on {q['val_samples']} rows")
        if p:
            lines.append(f"agreement:   top-1 {p['top1_agreement']:.4f} with torch fp32 on "
                         f"{p['samples']} samples")
    elif p:
        lines.append(f"parity:      max |onnx - torch| = {p['max_abs_diff']:.2e} on {p['samples']} "
                     f"samples, top-1 agreement {p['top1_agreement']:.4f}")
    return lines
