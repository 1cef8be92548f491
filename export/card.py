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

from export.errors import InputError

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
    version = card.get("card_version")
    if version not in READABLE_VERSIONS:
        raise InputError(f"{source}: model card version {version!r} is not supported "
                         f"(this runtime reads versions {', '.join(map(str, READABLE_VERSIONS))})")
    return card


def read_card(path: str | Path) -> dict:
    """Read the card of an ONNX file without loading its weights into a session."""
    import onnx  # deploy-side dependency; imported late to keep `trainer --help` fast

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: model file not found")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and others for non-ONNX bytes
        raise InputError(f"{path}: not an ONNX model ({type(exc).__name__})") from None
    return parse_card({p.key: p.value for p in model.metadata_props}, str(path))


def format_card(card: dict) -> str:
    """A readable summary for `trainer inspect`."""
    spec, data = card["input"], card["dataset"]
    lines = [f"task:        {card['task']}"]
    if card["task"] != "regression":
        lines.append(f"classes:     {len(card['class_names'])}: {', '.join(card['class_names'])}")
    lines += [
        f"input:       {spec['name']} {spec['dtype']} {spec['layout']} "
        f"shape [N, {', '.join(map(str, spec['shape']))}] values in {spec['value_range']}",
        f"outputs:     {', '.join(card['outputs'])}",
        f"precision:   {card.get('precision', 'fp32')}",
        f"dataset:     {data['name']} fingerprint {data['fingerprint'][:16]}... "
        f"splits {data['split_sizes']}",
    ]
    if card.get("metrics"):
        lines.append("metrics:     " + ", ".join(f"{k}={v:.4f}" for k, v in card["metrics"].items()))
    lines += gate_lines(card)
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
