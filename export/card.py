"""The model card: what a frozen model knows about itself, stored in ONNX `metadata_props`.

Pure Python (json + onnx protobuf access only), so the deploy side can read it without torch.
The card is one JSON document under the key `CARD_KEY`; `CARD_VERSION` is bumped whenever a
field changes meaning, and readers refuse versions they do not know.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from export.errors import InputError

CARD_KEY = "frozenfit.card"
CARD_VERSION = 1
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
    entry.value = json.dumps(card, sort_keys=True)


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
    if version != CARD_VERSION:
        raise InputError(f"{source}: model card version {version!r} is not supported "
                         f"(this runtime reads version {CARD_VERSION})")
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
    lines = [
        f"task:        {card['task']}",
        f"classes:     {len(card['class_names'])}: {', '.join(card['class_names'])}",
        f"input:       {spec['name']} {spec['dtype']} {spec['layout']} "
        f"shape [N, {', '.join(map(str, spec['shape']))}] values in {spec['value_range']}",
        f"outputs:     {', '.join(card['outputs'])}",
        f"dataset:     {data['name']} fingerprint {data['fingerprint'][:16]}... "
        f"splits {data['split_sizes']}",
    ]
    if card.get("metrics"):
        lines.append("metrics:     " + ", ".join(f"{k}={v:.4f}" for k, v in card["metrics"].items()))
    if card.get("parity"):
        p = card["parity"]
        lines.append(f"parity:      max |onnx - torch| = {p['max_abs_diff']:.2e} on {p['samples']} "
                     f"samples, top-1 agreement {p['top1_agreement']:.4f}")
    if card.get("training"):
        t = card["training"]
        lines.append(f"training:    {t.get('epochs')} epochs, seed {t.get('seed')}, "
                     f"checkpoint sha256 {t.get('checkpoint_sha256', '')[:16]}...")
    if card.get("versions"):
        lines.append("versions:    " + ", ".join(f"{k} {v}" for k, v in card["versions"].items()))
    if card.get("created"):
        lines.append(f"created:     {card['created']}")
    return "\n".join(lines)
