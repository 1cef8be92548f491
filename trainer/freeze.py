"""Checkpoint -> frozen ONNX graph with its model card, behind a parity gate.

The training side's exporter (it needs torch); what it writes is read by `export/`, which
never imports torch or this package. The graph takes raw inputs (uint8 pixels or
float features), normalises them itself, and returns logits and probabilities (or values)
with a dynamic batch axis. The torch.export-based exporter folds constants and BatchNorm
(Conv+BN and Linear+BN1d) into the preceding layer. Nothing is written unless
onnx.checker passes, onnxruntime agrees with torch on real held-out samples, and a
quantized variant keeps its accuracy.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import importlib.metadata as md
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from export import drift, variants
from trainer.gates import baseline_check
from export.atomic import atomic_path
from export.card import attach_card
from export.errors import InputError
from export.runtime import Prediction
from trainer.data.dataset import SplitRows
from trainer.runs import load_checkpoint

DEFAULT_OPSET = 18
# Max |output_onnx - output_torch| per precision: float32 reorderings stay around 1e-5;
# fp16 weights and activations carry ~3 significant digits. INT8 is gated by accuracy.
DEFAULT_ATOL = {"fp32": 1e-3, "fp16": 5e-2, "int8": float("inf")}
DEFAULT_MAX_ACCURACY_DROP = 0.5  # percentage points, INT8 vs float32 on the validation set
OUTPUTS = {"classification": ["logits", "probabilities"], "regression": ["values"]}


class ParityError(InputError):
    """The exported graph disagrees with torch, or a variant lost too much accuracy."""


@dataclass
class HeldOut:
    """Real samples the export is checked with."""

    parity_x: np.ndarray  # held-out test inputs (parity: onnxruntime vs torch)
    val_x: np.ndarray | SplitRows  # validation inputs and labels (gates, drift reference)
    val_y: np.ndarray
    calibration_x: np.ndarray  # training inputs (INT8 calibration)
    test_x: np.ndarray | SplitRows | None = None  # the test split, scored by the graph
    test_y: np.ndarray | None = None
    val_is_split: bool = False  # val_x/val_y are the whole validation split the run scored


def held_out(dm, parity: int = 512, calibration: int = 512, test: int = 20000) -> HeldOut:
    """Samples from a FixedDataModule: test rows, the whole validation split, a seeded
    training sample. The validation and test rows are read batch by batch when scored
    (SplitRows), so neither is held in memory at once."""
    train, val, tests = dm.splits["train"], dm.splits["val"], dm.splits["test"]
    pick = np.random.default_rng(0).choice(len(train), min(calibration, len(train)), False)
    tests = tests.subset(np.arange(min(test, len(tests))))
    return HeldOut(tests.arrays(parity)[0], SplitRows(val), val.y,
                   train.subset(np.sort(pick)).arrays()[0], SplitRows(tests), tests.y,
                   val_is_split=True)


def graph_outputs(model: onnx.ModelProto, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """The graph's first output (logits, or regression values) under onnxruntime (CPU)."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name, first = session.get_inputs()[0].name, session.get_outputs()[0].name
    return np.concatenate([session.run([first], {name: x[i:i + batch_size]})[0]
                           for i in range(0, len(x), batch_size)])


def graph_prediction(model: onnx.ModelProto, x: np.ndarray, task: str) -> Prediction:
    """What `Predictor.predict` returns, from an in-memory graph (before it has a card)."""
    if task == "regression":
        return Prediction(values=graph_outputs(model, x))
    probabilities = variants.probabilities(model, x)
    return Prediction(probabilities.argmax(axis=1), probabilities)


def graph_metrics(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray, task: str) -> dict:
    """The exported graph's own score on labelled rows, under onnxruntime."""
    out = graph_outputs(model, x)
    if task == "regression":
        return {"test/mae_onnx": float(np.abs(out - y).mean())}
    return {"test/acc_onnx": float((out.argmax(1) == y).mean())}


# How far a logit measured during training may be from the float32 graph's: float32
# reordering, or the rounding of the mixed precision the run validated in (bf16 keeps 8
# bits of mantissa, fp16 11).
METRIC_MARGIN = {"bf16": 0.1, "16": 0.02}


def _metric_margin(ckpt: dict, atol: float | None, variant: str) -> float:
    precision = str((ckpt.get("hardware") or {}).get("precision", "32"))
    for prefix, margin in METRIC_MARGIN.items():
        if precision.startswith(prefix):
            return margin
    return DEFAULT_ATOL["fp32"] if atol is None or variant != "fp32" else atol


def consistency_check(model: onnx.ModelProto, ckpt: dict, data: HeldOut, margin: float,
                      source: str) -> dict:
    """The float32 graph must score on the validation split what the checkpoint recorded
    for the same weights: accuracy up to the rows whose top-1 could flip by float
    reordering (logit margin below 2 x `margin`, the parity tolerance) or that the run did
    not score (DDP trims a split to a multiple of the world size); MAE up to `margin`."""
    metrics, regression = ckpt.get("metrics", {}), module_task(ckpt) == "regression"
    key = "val/mae" if regression else "val/acc"
    if key not in metrics or not data.val_is_split or not len(data.val_y):
        return {"checked": False, "reason": f"no recorded {key} for the whole validation split"
                if data.val_is_split else "validation split not available (--samples)"}
    validated, step = ckpt.get("validated_at_step"), int(ckpt.get("global_step", 0))
    if validated is not None and validated != step:
        raise ParityError(f"{source}: its {key} was measured at step {validated} but its weights "
                          f"are from step {step} (saved mid-epoch); export a checkpoint saved at "
                          f"an epoch end, or resume the run to finish the epoch; nothing written")
    y, out = data.val_y, graph_outputs(model, data.val_x)
    rows, recorded = len(y), float(metrics[key])
    rows_recorded = int(round(metrics.get("val/samples", rows)))
    if regression:
        graph = float(np.abs(out - y).mean())
        allowed = margin + 1e-5 * abs(recorded)
        ok = rows_recorded == rows and abs(graph - recorded) <= allowed
        detail = f"allowed difference {allowed:.2g}"
    else:
        correct = int((out.argmax(1) == y).sum())
        graph = correct / rows
        top2 = np.sort(out, axis=1)[:, -2:] if out.shape[1] > 1 else np.zeros((rows, 2))
        near_ties = int((top2[:, 1] - top2[:, 0] < 2 * margin).sum())
        allowed = near_ties + abs(rows - rows_recorded)
        ok = abs(correct - round(recorded * rows_recorded)) <= allowed
        detail = f"allowed difference {allowed} rows"
    result = {"checked": True, "metric": key, "recorded": recorded, "graph": graph,
              "rows": rows, "rows_recorded": rows_recorded, "allowed": allowed}
    if not ok:
        raise ParityError(f"{source}: the exported graph scores {key}={graph:.4f} on the {rows} "
                          f"validation rows, but the checkpoint recorded {recorded:.4f} on "
                          f"{rows_recorded} rows for the same weights ({detail}); its weights and "
                          f"metrics disagree; nothing written")
    return result


def module_task(ckpt: dict) -> str:
    return ckpt["hyper_parameters"]["data_info"].get("task", "classification")


class Frozen(nn.Module):
    """What the graph computes: raw input -> (logits, probabilities), or (values,)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.module(x)
        return (out,) if self.module.regression else (out, out.softmax(-1))


def init_args(ckpt: dict, key: str) -> dict:
    """Constructor arguments saved under `key`, without LightningCLI's private entries."""
    return {k: v for k, v in ckpt.get(key, {}).items() if not k.startswith("_")}


def module_from_checkpoint(ckpt: dict) -> nn.Module:
    from trainer.module import ClassifierModule

    module = ClassifierModule(**init_args(ckpt, "hyper_parameters"))
    module.load_state_dict(module.with_metric_states(ckpt["state_dict"]))
    return module.eval()


def held_out_from_checkpoint(ckpt: dict) -> HeldOut:
    """Rebuild the checkpoint's DataModule (same source, same split seed) for its samples."""
    from trainer.data.datamodule import FixedDataModule

    dm = FixedDataModule(**init_args(ckpt, "datamodule_hyper_parameters"))
    fp = ckpt["hyper_parameters"]["data_info"]["dataset"]["fingerprint"]
    if dm.dataset.fingerprint != fp:
        raise InputError(f"data.root: the dataset now has fingerprint {dm.dataset.fingerprint[:12]}, "
                         f"the checkpoint was trained on {fp[:12]}; pass --samples")
    return held_out(dm)


def checkpoint_metrics(ckpt: dict) -> dict[str, float]:
    """Metrics logged in the epoch the checkpoint was saved, plus the best monitored scores
    recorded by ModelCheckpoint callbacks."""
    out = {k: v for k, v in ckpt.get("metrics", {}).items() if not k.endswith("_step")}
    for state in ckpt.get("callbacks", {}).values():
        score, monitor = state.get("best_model_score"), state.get("monitor")
        if monitor and score is not None:
            out[f"best_{monitor}"] = float(score)
    return out


def _run_config(ckpt_path: Path) -> str | None:
    """The resolved config.yaml of the run the checkpoint belongs to, if it is beside it."""
    config = ckpt_path.parent.parent / "config.yaml"
    return config.read_text() if config.is_file() else None


def _epochs_trained(ckpt: dict) -> int:
    """Training epochs the weights have seen (`epoch` alone is off by one after fit ends)."""
    try:
        return int(ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except KeyError:
        return int(ckpt.get("epoch", -1)) + 1


def _run_epochs(ckpt: dict, ckpt_path: Path) -> int:
    """Epochs the whole run had trained: its last.ckpt's count when it lies beside."""
    last = ckpt_path.parent / "last.ckpt"
    if last.is_file() and last.resolve() != ckpt_path.resolve():
        try:  # memory-mapped: only the loop counters are read
            return max(_epochs_trained(torch.load(last, map_location="cpu", weights_only=True,
                                                  mmap=True)), _epochs_trained(ckpt))
        except Exception:  # an unreadable neighbour says nothing about this checkpoint
            pass
    return _epochs_trained(ckpt)


def build_card(ckpt: dict, ckpt_path: Path) -> dict:
    hp = init_args(ckpt, "hyper_parameters")
    data = init_args(ckpt, "datamodule_hyper_parameters")
    info = hp.pop("data_info")
    task = module_task(ckpt)
    return {
        "task": task,
        "class_names": info["class_names"],
        "input": info["input"],
        "outputs": OUTPUTS[task],
        "normalization": info["normalization"],
        "dataset": {**info["dataset"], "class_counts": info["stats"].get("class_counts")},
        "training_stats": info["stats"],
        "training": {
            "model": hp,
            "data": data,
            "config_yaml": _run_config(ckpt_path),
            "seed": data.get("seed"),
            "run_epochs": _run_epochs(ckpt, ckpt_path),
            "weights_epoch": _epochs_trained(ckpt),
            "global_step": int(ckpt.get("global_step", 0)),
            "checkpoint": ckpt_path.name,
            "hardware": ckpt.get("hardware"),  # device, ISA, precision and why
            "checkpoint_sha256": hashlib.sha256(ckpt_path.read_bytes()).hexdigest(),
        },
        "metrics": checkpoint_metrics(ckpt),
        "versions": {n: md.version(n) for n in ("torch", "lightning", "onnx", "onnxruntime")},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _torch_outputs(frozen: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return frozen(torch.from_numpy(x))[0].numpy()


def _top1(out: np.ndarray) -> np.ndarray:
    """Predicted class per row; for regression (N,) values there is nothing to agree on."""
    return out.argmax(-1) if out.ndim == 2 else np.zeros(len(out), np.int64)


def parity_check(frozen: nn.Module, model: onnx.ModelProto, samples: np.ndarray,
                 atol: float) -> dict:
    """Run onnxruntime and torch on the same samples at batch sizes 1, an odd size and all;
    raise ParityError if any logit (or regression value) differs by more than `atol`."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name, first = session.get_inputs()[0].name, session.get_outputs()[0].name
    n = len(samples)
    sizes = sorted({1, min(7, n), n})
    worst, agree = 0.0, []
    for bs in sizes:
        stop = min(n, 32) if bs == 1 else n  # 32 single-sample runs are plenty
        for start in range(0, stop, bs):
            x = samples[start:start + bs]
            got, ref = session.run([first], {name: x})[0], _torch_outputs(frozen, x)
            worst = max(worst, float(np.abs(got.astype(np.float32) - ref).max()))
            agree.append(_top1(got) == _top1(ref))
    result = {"samples": int(n), "batch_sizes": sizes, "max_abs_diff": worst,
              "top1_agreement": float(np.concatenate(agree).mean()),
              "atol": atol if np.isfinite(atol) else None}  # None: gated by accuracy (INT8)
    if not worst <= atol:
        raise ParityError(f"parity check failed: max |onnx - torch| output difference {worst:.3g} "
                          f"exceeds --atol {atol:g} on {n} held-out samples; nothing written")
    return result


def _quantize_gate(fp32: onnx.ModelProto, int8: onnx.ModelProto, data: HeldOut,
                   max_drop: float) -> dict:
    base = variants.accuracy(fp32, data.val_x, data.val_y)
    quant = variants.accuracy(int8, data.val_x, data.val_y)
    drop = 100.0 * (base - quant)
    result = {"val_accuracy_fp32": base, "val_accuracy_int8": quant,
              "drop_points": drop, "max_drop_points": max_drop, "val_samples": len(data.val_y)}
    if drop > max_drop:
        raise ParityError(f"int8 quantization lost {drop:.2f} accuracy points on {len(data.val_y)} "
                          f"validation samples ({base:.4f} -> {quant:.4f}), more than "
                          f"--max-accuracy-drop {max_drop:g}; nothing written")
    return result


def export_checkpoint(ckpt_path: str | Path, out: str | Path, data: HeldOut | None = None,
                      opset: int = DEFAULT_OPSET, atol: float | None = None,
                      precision: str = "fp32", quantize: str | None = None,
                      max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP,
                      allow_trivial: bool = False) -> dict:
    """Export `ckpt_path` to `out` (atomically) and return the model card written into it.

    precision: fp32 or fp16; quantize: None or "int8" (static QDQ, calibrated on training
    samples, refused if validation accuracy drops by more than `max_accuracy_drop` points);
    allow_trivial: export a model no better than a constant answer (see baseline_check).
    """
    ckpt_path, out = Path(ckpt_path), Path(out)
    variant = "int8" if quantize == "int8" else precision
    if quantize not in (None, "int8") or precision not in ("fp32", "fp16"):
        raise InputError(f"--precision fp32|fp16 and --quantize int8 only; got {precision}, {quantize}")
    if quantize and precision == "fp16":
        raise InputError("--quantize int8 starts from fp32; do not combine it with --precision fp16")
    ckpt = load_checkpoint(ckpt_path)
    module = module_from_checkpoint(ckpt)
    if quantize and module.regression:
        raise InputError("--quantize int8 is for classifiers; its gate is accuracy")
    frozen = Frozen(module).eval()
    data = data or held_out_from_checkpoint(ckpt)
    spec, outputs = ckpt["hyper_parameters"]["data_info"]["input"], OUTPUTS[module_task(ckpt)]
    def cast(a):  # SplitRows already read as the spec's dtype (uint8 or float32)
        return a if isinstance(a, SplitRows) else np.ascontiguousarray(
            a.astype(spec["dtype"], copy=False))

    data = dataclasses.replace(data, parity_x=cast(data.parity_x), val_x=cast(data.val_x),
                               calibration_x=cast(data.calibration_x),
                               test_x=None if data.test_x is None else cast(data.test_x))

    example = torch.from_numpy(data.parity_x[:2].copy())  # writable: the rows may be mapped
    program = torch.onnx.export(
        frozen, (example,), input_names=[spec["name"]],
        output_names=outputs, opset_version=opset, dynamo=True, external_data=False,
        dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
    )
    frozen.eval()  # the exporter restores the wrapper's own mode; keep it in eval
    model = program.model_proto
    got = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if got != opset:  # the exporter keeps its own opset when it cannot convert the graph
        raise InputError(f"--opset {opset}: the exporter could not convert this graph from "
                         f"opset {got}; use --opset {got} or newer")
    card = build_card(ckpt, ckpt_path)
    card["opset"], card["precision"] = opset, variant
    card["consistency"] = consistency_check(model, ckpt, data, _metric_margin(ckpt, atol, variant),
                                            str(ckpt_path))
    card["baseline"] = baseline_check(card["consistency"], data.val_y, card, allow_trivial,
                                      str(ckpt_path))
    if variant == "fp16":
        model = variants.to_fp16(model)
    elif variant == "int8":
        int8 = variants.to_int8(model, data.calibration_x)
        card["quantization"] = _quantize_gate(model, int8, data, max_accuracy_drop)
        model = int8
    card["parity"] = parity_check(frozen, model, data.parity_x,
                                  DEFAULT_ATOL[variant] if atol is None else atol)
    if len(data.val_x):  # what the batch jobs' drift tests compare with
        card["drift_reference"] = drift.reference(card, data.val_x,
                                                  graph_prediction(model, data.val_x, card["task"]))
    if data.test_y is not None and len(data.test_y):
        card["metrics"].update(graph_metrics(model, data.test_x, data.test_y, card["task"]))
    attach_card(model, card)
    onnx.checker.check_model(model, full_check=True)
    with atomic_path(out) as tmp:
        onnx.save_model(model, str(tmp))
    if note := drift.small_reference(card):  # said once the model is written
        print(f"export: drift reference of {len(data.val_x)} validation rows: {note}",
              file=sys.stderr)
    return card
