"""Checkpoint -> frozen ONNX graph with its model card, behind the gates (trainer/gates.py).

The training side's exporter (it needs torch); what it writes is read by `export/`, which
never imports torch or this package. The graph takes raw inputs (uint8 pixels or
float features), normalises them itself, and returns logits and probabilities (or values)
with a dynamic batch axis. The torch.export-based exporter folds constants and BatchNorm
(Conv+BN and Linear+BN1d) into the preceding layer. Nothing is written unless
onnx.checker passes and every gate does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import importlib.metadata as md
import logging
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from export import drift
from export.atomic import atomic_path, check_output
from export.card import OUTPUTS, Card, HardwareChoice, ModelSettings, Training, attach_card
from export.errors import InputError
from export.runtime import Predictor
from trainer import variants
from trainer.calibration import calibrate, softmax, with_test
from trainer.data.dataset import SplitRows, wide
from trainer.gates import (DEFAULT_ATOL, DEFAULT_MAX_ACCURACY_DROP, HeldOut, ParityError,
                           baseline_check, consistency_check, metric_margin, test_metrics,
                           parity_check, quantization_check, score)
from trainer.runs import (checkpoint_data, checkpoint_metrics, epochs_trained,
                          from_checkpoint, init_args, load_checkpoint, loadable_state,
                          run_config, run_epochs)

__all__ = ["DEFAULT_OPSET", "HeldOut", "ParityError", "export_checkpoint", "held_out"]
DEFAULT_OPSET = 18


def held_out(dm, parity: int = 512, calibration: int = 512, test: int = 20000) -> HeldOut:
    """Samples from a FixedDataModule: test rows, the whole validation split, a seeded
    training sample. The validation and test rows are read batch by batch when scored
    (SplitRows), so neither is held in memory at once."""
    train, val, tests = dm.splits["train"], dm.splits["val"], dm.splits["test"]
    pick = np.random.default_rng(0).choice(len(train), min(calibration, len(train)), False)
    tests = tests.subset(np.arange(min(test, len(tests))))
    return HeldOut(tests.arrays(parity)[0], SplitRows(val), wide(val.y),
                   train.subset(np.sort(pick)).arrays()[0], SplitRows(tests), wide(tests.y),
                   val_is_split=True)


# The temperature the graph is first exported with: any value but 1 (the exporter folds a
# division by 1 away), replaced in the graph by the fitted one (set_temperature).
PLACEHOLDER_T = 2.0


class Frozen(nn.Module):
    """What the graph computes: raw input -> (logits, softmax(logits / temperature)), or
    (values,). The temperature is a buffer, so the graph holds it as an initializer."""

    def __init__(self, module: nn.Module, temperature: float = PLACEHOLDER_T):
        super().__init__()
        self.module = module
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.module(x)
        if self.module.regression:
            return (out,)
        return out, (out / self.temperature).softmax(-1)


def set_temperature(model: onnx.ModelProto, frozen: Frozen, t: float, card: Card,
                    example: np.ndarray, opset: int) -> onnx.ModelProto:
    """`model` with its probabilities at temperature `t` (and `frozen` likewise): the
    graph's temperature initializer rewritten in place, or, from an exporter that named or
    folded it otherwise, the graph exported again."""
    frozen.temperature.fill_(t)
    found = [i for i in model.graph.initializer if i.name == "temperature"]
    if len(found) == 1 and onnx.numpy_helper.to_array(found[0]).size == 1:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(found[0].data_type)
        found[0].CopyFrom(onnx.numpy_helper.from_array(np.array(t, dtype), "temperature"))
        return model
    return to_onnx(frozen, card, example, opset)


def module_from_checkpoint(ckpt: dict, backbone: nn.Module | None = None) -> nn.Module:
    """The checkpoint's module with its weights; `backbone`: the network object a script
    handed over (a checkpoint keeps only its class path, trainer/models/custom.py)."""
    from trainer.module import ClassifierModule

    module = from_checkpoint(ClassifierModule, ckpt, "hyper_parameters",
                             **({"backbone": backbone} if backbone is not None else {}))
    module.load_state_dict(loadable_state(module, ckpt["state_dict"]))
    return module.eval()


def check_not_a_data_file(out: Path, ckpt: dict) -> None:
    """An export that reads the checkpoint's own dataset has those files as inputs: `--out`
    naming the training table wrote the ONNX model over it."""
    from export.tables import root_path
    from trainer.data.cache import cache_root

    dm = init_args(ckpt, "datamodule_hyper_parameters")
    check_output(out, "--out", {"the checkpoint's data.root": root_path(dm.get("root")),
                                "data.cache_dir": cache_root(dm.get("cache_dir"))})


def held_out_from_checkpoint(ckpt: dict, out: Path | None = None) -> HeldOut:
    """Rebuild the checkpoint's DataModule (same source, same split seed) for its samples;
    an export's `out` that is one of its files is refused before they are read."""
    from trainer.data.datamodule import FixedDataModule

    if out is not None:
        check_not_a_data_file(out, ckpt)
    dm = from_checkpoint(FixedDataModule, ckpt, "datamodule_hyper_parameters")
    fp = checkpoint_data(ckpt).dataset.fingerprint
    if dm.dataset.fingerprint != fp:
        raise InputError(f"data.root: the dataset now has fingerprint {dm.dataset.fingerprint[:12]}, "
                         f"the checkpoint was trained on {fp[:12]}; pass --samples")
    return held_out(dm)


def _parent_sha256(init_from: str | None) -> str | None:
    """Lineage: the file a warm-started run began from, by content (None if it is gone)."""
    if not init_from or not Path(init_from).is_file():
        return None
    from export.jobstate import sha256_file

    return sha256_file(Path(init_from))


def build_card(ckpt: dict, ckpt_path: Path) -> Card:
    """The card's parts a checkpoint knows; the export adds what its gates measure."""
    hp = init_args(ckpt, "hyper_parameters")
    data = init_args(ckpt, "datamodule_hyper_parameters")
    source = str(ckpt_path)
    hp.pop("data_info")
    info = checkpoint_data(ckpt, source)
    return Card(
        task=info.task, class_names=info.class_names, outputs=OUTPUTS[info.task],
        input=info.input, normalization=info.normalization.to_json(),
        dataset=dataclasses.replace(info.dataset, change=None,  # the card keeps it in training
                                    class_counts=info.stats.get("class_counts")),
        training_stats=info.stats,
        training=Training(
            model=ModelSettings.from_json(hp, source, "training.model."), data=data,
            config_yaml=run_config(ckpt_path), seed=data.get("seed"),
            run_epochs=run_epochs(ckpt, ckpt_path), weights_epoch=epochs_trained(ckpt),
            global_step=int(ckpt.get("global_step", 0)), checkpoint=ckpt_path.name,
            hardware=HardwareChoice.from_json(ckpt["hardware"], source, "hardware.")
            if isinstance(ckpt.get("hardware"), dict) else None,  # device, precision and why
            checkpoint_sha256=hashlib.sha256(ckpt_path.read_bytes()).hexdigest(),
            parent_sha256=_parent_sha256(hp.get("init_from")),
            dataset_change=info.dataset.change),
        metrics=checkpoint_metrics(ckpt),
        versions={n: md.version(n) for n in ("torch", "lightning", "onnx", "onnxruntime")},
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))


@contextlib.contextmanager
def _exporter_logs_quiet():
    """Below opset 18 the exporter warns that it converts, and onnxscript logs a failed
    conversion with its traceback; the opset check below says it in one line (--debug,
    which logs at DEBUG, keeps them)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript")]
    levels = [lg.level for lg in loggers]
    quiet = logging.getLogger().level > logging.DEBUG
    for lg in loggers if quiet else ():
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def to_onnx(frozen: nn.Module, card: Card, example: np.ndarray, opset: int) -> onnx.ModelProto:
    """The float32 graph of `frozen`, with a dynamic batch axis, at exactly `opset`."""
    with _exporter_logs_quiet():
        program = torch.onnx.export(
            frozen, (torch.from_numpy(example.copy()),),  # writable: the rows may be mapped
            input_names=[card.input.name], output_names=list(card.outputs),
            opset_version=opset, dynamo=True, external_data=False,
            dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    frozen.eval()  # the exporter restores the wrapper's own mode; keep it in eval
    model = program.model_proto
    got = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if got != opset:  # the exporter keeps its own opset when it cannot convert the graph
        raise InputError(f"--opset {opset}: the exporter could not convert this graph from "
                         f"opset {got}; use --opset {got} or newer")
    return model


def deployed(model: onnx.ModelProto, card: Card, source: str) -> Predictor:
    """`model` with `card`, loaded as a deployment loads it (the card read back and checked
    against the graph): what the gates score."""
    attach_card(model, card)
    return Predictor.from_bytes(model.SerializeToString(), source)


def _variant(model: onnx.ModelProto, variant: str, data: HeldOut) -> onnx.ModelProto:
    if variant == "fp16":
        return variants.to_fp16(model)
    return variants.to_int8(model, data.calibration_x)


def _samples(data: HeldOut | Path | None, card: Card, quantize: str | None, ckpt: dict,
             out: Path) -> HeldOut:
    """`data` as it is, the held-out rows of an .npz/.npy given with --samples, checked
    as trainer predict checks its inputs (the card's input, one label a row of its classes):
    a file of other shapes or labels was a traceback from the ONNX export or the gates; or
    (None) the checkpoint's own splits."""
    if data is None:
        return held_out_from_checkpoint(ckpt, out)
    if not isinstance(data, Path):
        return data
    from export.readers import labels_to_index, read_arrays
    from export.runtime import check_input

    x, y = read_arrays(data)
    x = check_input(card.input, np.asarray(x), str(data))
    if not len(x):
        raise InputError(f"{data}: no rows; expected held-out samples to check the export with")
    if y is None:
        if quantize:
            raise InputError(f"{data}: --quantize needs labels 'y' to measure accuracy")
        return HeldOut(x, x, np.zeros(len(x), np.int64), x, val_labelled=False)
    if len(y) != len(x):  # (read_arrays checked one label a row)
        raise InputError(f"{data}: 'y' has shape {y.shape}; expected one label a row of 'x' "
                         f"({len(x)})")
    return HeldOut(x, x, labels_to_index(np.asarray(y), list(card.class_names), f"{data}:y"), x)


def _cast(data: HeldOut, dtype: str) -> HeldOut:
    def cast(a):  # SplitRows already read as the spec's dtype (uint8 or float32)
        return a if a is None or isinstance(a, SplitRows) else np.ascontiguousarray(
            a.astype(dtype, copy=False))

    return dataclasses.replace(data, parity_x=cast(data.parity_x), val_x=cast(data.val_x),
                               calibration_x=cast(data.calibration_x), test_x=cast(data.test_x))


def _variant_name(precision: str, quantize: str | None) -> str:
    if quantize not in (None, "int8") or precision not in ("fp32", "fp16"):
        raise InputError(f"--precision fp32|fp16 and --quantize int8 only; got {precision}, {quantize}")
    if quantize and precision == "fp16":
        raise InputError("--quantize int8 starts from fp32; do not combine it with --precision fp16")
    return "int8" if quantize == "int8" else precision


def export_checkpoint(ckpt_path: str | Path, out: str | Path, data: HeldOut | Path | None = None,
                      opset: int = DEFAULT_OPSET, atol: float | None = None,
                      precision: str = "fp32", quantize: str | None = None,
                      max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP,
                      allow_trivial: bool = False, calibrate_t: bool = True,
                      backbone: nn.Module | None = None) -> Card:
    """Export `ckpt_path` to `out` (atomically) and return the model card written into it.

    data: held-out rows, an .npz/.npy (--samples) or None (the checkpoint's split); precision:
    fp32 or fp16; quantize: None or "int8" (static QDQ calibrated on training samples, refused
    if validation accuracy drops by over `max_accuracy_drop` points); allow_trivial: export a
    model no better than a constant answer (baseline_check); calibrate_t: temperature-scale a
    classifier (the conformal scores are stored either way); backbone: module_from_checkpoint."""
    ckpt_path, out, source = Path(ckpt_path), Path(out), str(ckpt_path)
    variant = _variant_name(precision, quantize)
    ckpt = load_checkpoint(ckpt_path)
    module = module_from_checkpoint(ckpt, backbone)
    if quantize and module.regression:
        raise InputError("--quantize int8 is for classifiers; its gate is accuracy")
    frozen = Frozen(module).eval()
    card = build_card(ckpt, ckpt_path).replace(opset=opset, precision=variant)
    data = _cast(_samples(data, card, quantize, ckpt, out), card.input.dtype)
    model = to_onnx(frozen, card, data.parity_x[:2], opset)
    graph = deployed(model, card, source)  # one session per graph, the validation split
    val = score(graph, data.val_x)         # scored once by it
    consistency = consistency_check(val, ckpt, data, metric_margin(ckpt, atol, variant), source)
    card = card.replace(consistency=consistency, baseline=baseline_check(
        consistency, data.val_y, card, allow_trivial, source))
    if val is not None and data.val_labelled:
        card = card.replace(calibration=calibrate(card.task, val, data.val_y, temperature=(
            calibrate_t), seed=card.training.seed or 0))
    if not card.regression:  # the placeholder temperature becomes the fitted one (or 1)
        t = (card.calibration and card.calibration.temperature) or 1.0
        model = set_temperature(model, frozen, t, card, data.parity_x[:2], opset)
        graph = deployed(model, card, source)
        if val is not None:
            val = dataclasses.replace(val, probabilities=softmax(val.logits, t))
    if variant != "fp32":
        model = _variant(model, variant, data)
        graph, fp32_val = deployed(model, card, source), val
        val = score(graph, data.val_x)
        if variant == "int8":
            card = card.replace(quantization=quantization_check(fp32_val, val, data.val_y,
                                                                max_accuracy_drop))
    card = card.replace(parity=parity_check(frozen, graph, data.parity_x,
                                            DEFAULT_ATOL[variant] if atol is None else atol))
    if val is not None:  # what the batch jobs' drift tests compare with
        card = card.replace(drift_reference=drift.reference(card, data.val_x, val))
    if data.test_y is not None and len(data.test_y):
        test = score(graph, data.test_x)
        card = card.replace(metrics={**card.metrics, **test_metrics(test, data.test_y)},
                            calibration=with_test(card.calibration, test, data.test_y))
    attach_card(model, card)
    onnx.checker.check_model(model, full_check=True)
    with atomic_path(out) as tmp:
        onnx.save_model(model, str(tmp))
    if note := drift.small_reference(card):  # said once the model is written
        print(f"export: drift reference of {len(data.val_x)} validation rows: {note}",
              file=sys.stderr)
    return card
