"""The model card as typed records (export/records.py): what a frozen model knows about
itself. The card is one JSON document under `CARD_KEY` in the ONNX graph's `metadata_props`;
`CARD_VERSION` is bumped whenever a field changes meaning, and readers refuse versions they
do not know. Pure Python (json + onnx protobuf access): the deploy side reads it without torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.conformal import Calibration
from export.dataset_card import DatasetChange, DatasetInfo
from export.driftref import DriftReference, summary_names
from export.errors import InputError, require_file
from export.names import check_class_names, shown
from export.records import (Record, entry, fail, is_bool, is_dict, is_num, is_str, list_of,
                            load_json, one_of)

CARD_KEY = "frozenfit.card"
CARD_VERSION = 2  # 2: training.epochs split into run_epochs and weights_epoch
READABLE_VERSIONS = (1, 2)
OUTPUTS = {"classification": ("logits", "probabilities"), "regression": ("values",)}


@dataclass(frozen=True, kw_only=True)
class InputSpec(Record):
    """What the graph takes, per row: raw pixels (uint8 NCHW) or float32 features."""

    name: str = entry(is_str, "the graph's input name")
    kind: str = entry(one_of("image", "tabular"), "image or tabular")
    dtype: str = entry(one_of("uint8", "float32"), "uint8 or float32")
    shape: tuple[int, ...] = entry(
        lambda v: list_of(lambda d: isinstance(d, int) and not isinstance(d, bool) and d > 0)(v)
        and len(v) > 0, "a list of positive sizes")
    value_range: tuple[float, float] = entry(list_of(is_num, 2), "[low, high]")
    layout: str | None = entry(is_str, "a layout such as NCHW", None)
    color_mode: str | None = entry(one_of("L", "RGB"), "L or RGB", None)
    columns: tuple[str, ...] | None = entry(list_of(is_str), "a list of column names", None)
    resize: tuple[int, int] | None = entry(list_of(is_num, 2), "[height, width]", None)
    preprocessing: dict | None = entry(is_dict, "an object", None)

    @property
    def image(self) -> bool:
        return self.kind == "image"

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape) * (1 if self.dtype == "uint8" else 4)

    def validate(self, source: str) -> None:
        if self.image and (len(self.shape) != 3 or self.shape[0] not in (1, 3)):
            raise InputError(f"{source}: model card field 'input.shape' is {list(self.shape)}; "
                             f"an image model takes [channels (1 or 3), height, width]")
        if not self.image and self.columns is not None and [len(self.columns)] != list(self.shape):
            raise InputError(f"{source}: model card field 'input.columns' names "
                             f"{len(self.columns)} columns but 'input.shape' is {list(self.shape)}")


@dataclass(frozen=True, kw_only=True)
class Consistency(Record):
    """The float32 graph's validation metric beside the one the checkpoint recorded."""

    checked: bool = entry(lambda v: isinstance(v, bool), "true or false")
    reason: str = entry(is_str, "a reason", "")
    metric: str | None = entry(is_str, "a metric name", None)
    graph: float | None = entry(is_num, "a number", None)
    recorded: float | None = entry(is_num, "a number", None)
    rows: int | None = entry(is_num, "a number", None)
    rows_recorded: int | None = entry(is_num, "a number", None)
    allowed: float | None = entry(is_num, "a number", None)

    def validate(self, source: str) -> None:
        if self.checked and None in (self.metric, self.graph, self.recorded, self.rows):
            fail(source, "consistency", self.to_json(),
                 "an object with checked, metric, graph, recorded, rows")


@dataclass(frozen=True, kw_only=True)
class Baseline(Record):
    """The graph's validation metric beside the best constant answer's."""

    checked: bool = entry(lambda v: isinstance(v, bool), "true or false")
    reason: str = entry(is_str, "a reason", "")
    metric: str | None = entry(is_str, "a metric name", None)
    model: float | None = entry(is_num, "a number", None)
    constant: float | None = entry(is_num, "a number", None)
    constant_answer: str | None = entry(is_str, "what the constant answer is", None)
    better: bool | None = entry(lambda v: isinstance(v, bool), "true or false", None)

    def validate(self, source: str) -> None:
        if self.checked and None in (self.metric, self.model, self.constant, self.constant_answer):
            fail(source, "baseline", self.to_json(),
                 "an object with checked, metric, model, constant, constant_answer")


@dataclass(frozen=True, kw_only=True)
class Parity(Record):
    """onnxruntime against torch on the same held-out rows."""

    samples: int = entry(is_num, "a number")
    max_abs_diff: float = entry(is_num, "a number")
    top1_agreement: float = entry(is_num, "a number")
    batch_sizes: tuple[int, ...] | None = entry(list_of(is_num), "a list of sizes", None)
    atol: float | None = entry(is_num, "a number (null: gated by accuracy)", None)


@dataclass(frozen=True, kw_only=True)
class Quantization(Record):
    """The INT8 graph's validation accuracy against the float32 graph's."""

    val_accuracy_fp32: float = entry(is_num, "a number")
    val_accuracy_int8: float = entry(is_num, "a number")
    drop_points: float = entry(is_num, "a number")
    max_drop_points: float = entry(is_num, "a number")
    val_samples: int = entry(is_num, "a number")


@dataclass(frozen=True, kw_only=True)
class HardwareChoice(Record):
    """The precision and memory layout a fit ran with, and why: decided once
    (trainer/hardware.choose), carried by the Trainer, saved into the checkpoint, metrics.json
    and the card. `channels_last` is None until the model is known."""

    device: str = entry(is_str, "a device description")
    precision: str = entry(is_str, "a Lightning precision")
    reason: str | None = entry(is_str, "a sentence", None)
    isa: str | None = entry(is_str, "torch's CPU capability", None)
    bf16_native: tuple | None = entry(list_of(is_str), "a list of CPU features", None)
    capability: str | None = entry(is_str, "a CUDA compute capability", None)
    channels_last: bool | None = entry(is_bool, "true or false", None)
    layout_reason: str | None = entry(is_str, "a sentence", None)
    step_ms: dict | None = entry(is_dict, "an object of milliseconds", None)

    KEPT = "; kept from the checkpoint on resume"

    def with_layout(self, channels_last: bool, reason: str | None) -> HardwareChoice:
        return dataclasses.replace(self, channels_last=channels_last, layout_reason=reason)

    def kept_on_resume(self) -> HardwareChoice:
        return dataclasses.replace(self, reason=(self.reason or "").removesuffix(self.KEPT)
                                   + self.KEPT)


def _is_layout(v) -> bool:
    return isinstance(v, bool) or v == "auto"


@dataclass(frozen=True, kw_only=True)
class ModelSettings(Record):
    """The model's options as the run gave them (ClassifierModule's arguments); options
    this record does not name stay in `extra`."""

    arch: str | None = entry(is_str, "an architecture name", None)
    width: int | None = entry(is_num, "a number", None)
    backbone: dict | None = entry(is_dict, "an object with class_path", None)
    init_from: str | None = entry(is_str, "a checkpoint path", None)
    backbone_weights: str | None = entry(is_str, "a weights file", None)
    optimizer: str | None = entry(is_str, "an optimizer name", None)
    lr: float | None = entry(is_num, "a number", None)
    schedule: str | None = entry(is_str, "a schedule name", None)
    channels_last: bool | str | None = entry(_is_layout, "true, false or auto", None)

    @property
    def network(self) -> str | None:
        """What `trainer inspect` names: the custom backbone's class, else the arch."""
        return (self.backbone or {}).get("class_path") or self.arch


@dataclass(frozen=True, kw_only=True)
class Training(Record):
    """How the weights were made: the run's options, epochs, seed and checkpoint."""

    seed: int | None = entry(is_num, "a number", None)
    run_epochs: int | None = entry(is_num, "a number", None)
    weights_epoch: int | None = entry(is_num, "a number", None)
    epochs: int | None = entry(is_num, "a number (card version 1)", None)
    global_step: int | None = entry(is_num, "a number", None)
    checkpoint: str | None = entry(is_str, "a file name", None)
    checkpoint_sha256: str | None = entry(is_str, "a SHA-256 hex string", None)
    parent_sha256: str | None = entry(is_str, "the SHA-256 of --model.init_from's file", None)
    dataset_change: DatasetChange | None = entry(None, "an object", None, record=DatasetChange)
    hardware: HardwareChoice | None = entry(None, "an object", None, record=HardwareChoice)
    model: ModelSettings = entry(None, "an object", ModelSettings(), record=ModelSettings)
    data: dict = entry(is_dict, "an object", {})
    config_yaml: str | None = entry(is_str, "the run's YAML", None)


@dataclass(frozen=True, kw_only=True)
class Card(Record):
    """The whole card, stored as one JSON document in the ONNX graph's metadata."""

    task: str = entry(one_of("classification", "regression"), "classification or regression")
    class_names: tuple[str, ...] = entry(list_of(is_str), "a list of class names")
    input: InputSpec = entry(None, "an object", record=InputSpec)
    outputs: tuple[str, ...] = entry(list_of(is_str), "a list of output names")
    dataset: DatasetInfo = entry(None, "an object", record=DatasetInfo)
    card_version: int = entry(one_of(*READABLE_VERSIONS), "a readable version", CARD_VERSION)
    metrics: dict = entry(lambda v: is_dict(v) and all(is_num(x) for x in v.values()),
                          "an object of numbers", {})
    precision: str = entry(one_of("fp32", "fp16", "int8"), "fp32, fp16 or int8", "fp32")
    opset: int | None = entry(is_num, "an opset number", None)
    created: str | None = entry(is_str, "a timestamp", None)
    consistency: Consistency | None = entry(None, "an object", None, record=Consistency)
    baseline: Baseline | None = entry(None, "an object", None, record=Baseline)
    parity: Parity | None = entry(None, "an object", None, record=Parity)
    quantization: Quantization | None = entry(None, "an object", None, record=Quantization)
    calibration: Calibration | None = entry(None, "an object", None, record=Calibration)
    drift_reference: DriftReference | None = entry(None, "an object", None,
                                                   record=DriftReference)
    normalization: dict | None = entry(is_dict, "an object", None)
    training_stats: dict | None = entry(is_dict, "an object", None)
    training: Training | None = entry(None, "an object", None, record=Training)
    versions: dict = entry(is_dict, "an object", {})

    @property
    def regression(self) -> bool:
        return self.task == "regression"

    def validate(self, source: str) -> None:
        if not self.regression and not self.class_names:
            raise InputError(f"{source}: model card field 'class_names' is empty for a classifier")
        # what training refuses; a card edited or written elsewhere reached every answer
        check_class_names(self.class_names, f"{source}: model card field 'class_names'")
        if len(set(self.class_names)) < len(self.class_names):
            twice = next(n for i, n in enumerate(self.class_names) if n in self.class_names[:i])
            raise InputError(f"{source}: model card field 'class_names' holds {shown(twice)} "
                             "twice; expected one name a class")
        want = OUTPUTS[self.task]
        if self.outputs != want:
            raise InputError(f"{source}: model card field 'outputs' is {list(self.outputs)}; a "
                             f"{self.task} model has {list(want)}")
        if ref := self.drift_reference:
            names = summary_names(self)
            if len(ref.continuous) != len(names):
                raise InputError(f"{source}: model card field 'drift_reference.continuous' "
                                 f"has {len(ref.continuous)} checks; this model's input has "
                                 f"{len(names)} ({', '.join(names)})")
            classes = 0 if self.regression else len(self.class_names)
            if ref.classes is not None and len(ref.classes) != classes:
                raise InputError(f"{source}: model card field 'drift_reference.classes' has "
                                 f"{len(ref.classes)} counts; the model has {classes or 'no'} "
                                 "classes")

    def replace(self, **changes) -> Card:
        return dataclasses.replace(self, **changes)


def attach_card(model_proto: Any, card: Card) -> None:
    """Store `card` in an `onnx.ModelProto`'s metadata, replacing any earlier card."""
    for prop in list(model_proto.metadata_props):
        if prop.key == CARD_KEY:
            model_proto.metadata_props.remove(prop)
    entry_ = model_proto.metadata_props.add()
    entry_.key = CARD_KEY
    entry_.value = json.dumps(jsonable(card.replace(card_version=CARD_VERSION).to_json()),
                              sort_keys=True, allow_nan=False)


def jsonable(value: Any) -> Any:
    """`value` with every non-finite float replaced by None: strict JSON, which has no
    Infinity or NaN (older cards stored an INT8 parity tolerance of Infinity)."""
    if isinstance(value, Record):
        value = value.to_json()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def parse_card(metadata: dict[str, str], source: str) -> Card:
    """Decode and validate the card from an ONNX metadata map; `source` names the file."""
    if CARD_KEY not in metadata:
        raise InputError(f"{source}: ONNX model has no '{CARD_KEY}' model card; "
                         "export it with `trainer export`")
    try:
        doc = load_json(metadata[CARD_KEY])
    except ValueError as exc:
        raise InputError(f"{source}: model card is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise InputError(f"{source}: model card is not a JSON object")
    version = doc.get("card_version")
    if version not in READABLE_VERSIONS:
        raise InputError(f"{source}: model card version {version!r} is not supported "
                         f"(this runtime reads versions {', '.join(map(str, READABLE_VERSIONS))})")
    return Card.from_json(doc, source)


def check_graph(card: Card, inputs: list[tuple[str, str, list]], outputs: dict[str, list],
                source: str) -> None:
    """The card must describe the graph it is attached to: input name, dtype and shape,
    output names, and as many logits as classes. `inputs`: (name, numpy dtype name,
    shape with None or a name for dynamic axes); `outputs`: name -> shape."""
    spec = card.input
    if len(inputs) != 1:
        raise InputError(f"{source}: the graph has {len(inputs)} inputs; the card describes one")
    name, dtype, shape = inputs[0]
    if name != spec.name:
        raise InputError(f"{source}: model card field 'input.name' is {spec.name!r} but the "
                         f"graph's input is {name!r}")
    if dtype != spec.dtype:
        raise InputError(f"{source}: model card field 'input.dtype' is {spec.dtype} but the "
                         f"graph takes {dtype}")
    static = [d if isinstance(d, int) else None for d in shape[1:]]
    if len(static) != len(spec.shape) or any(
            d is not None and d != want for d, want in zip(static, spec.shape)):
        raise InputError(f"{source}: model card field 'input.shape' is {list(spec.shape)} but the "
                         f"graph takes {list(shape)}")
    missing = [o for o in card.outputs if o not in outputs]
    if missing:
        raise InputError(f"{source}: model card output {missing[0]!r} is not an output of the "
                         f"graph ({sorted(outputs)})")
    width = None if card.regression else outputs.get("logits", [None, None])[-1]
    if isinstance(width, int) and width != len(card.class_names):
        raise InputError(f"{source}: model card field 'class_names' has {len(card.class_names)} "
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


def read_card(path: str | Path) -> Card:
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
