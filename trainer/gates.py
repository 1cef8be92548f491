"""The gates an export passes, each scoring the graph through the deployed `Predictor`
(one onnxruntime session per graph, built from its bytes, its card checked as a deployment
would): the float32 graph must score the metric the checkpoint recorded (consistency) and
beat the best constant answer (baseline); the graph written must agree with torch (parity),
and an INT8 graph must keep the float32 accuracy (quantization). A failing gate raises one
line and nothing is written."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from export.card import Baseline, Card, Consistency, Parity, Quantization
from export.errors import InputError
from export.runtime import Prediction, Predictor
from trainer.data.dataset import SplitRows
from trainer.runs import checkpoint_data

# Max |output_onnx - output_torch| per precision: float32 reorderings stay around 1e-5;
# fp16 weights and activations carry ~3 significant digits. INT8 is gated by accuracy.
DEFAULT_ATOL = {"fp32": 1e-3, "fp16": 5e-2, "int8": float("inf")}
DEFAULT_MAX_ACCURACY_DROP = 0.5  # percentage points, INT8 vs float32 on the validation set
SCORE_ROWS = 512  # rows per onnxruntime call when a gate scores a split


class ParityError(InputError):
    """The exported graph disagrees with torch, or a variant lost too much accuracy."""


class TrivialModelError(InputError):
    """The model scores no better than always giving the same answer."""


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
    val_labelled: bool = True  # val_y are real labels (calibration is fitted on them)


def score(predictor: Predictor, x) -> Prediction | None:
    """The deployed graph's prediction of every row of `x` (an array, or split rows read
    slice by slice); None for no rows."""
    if not len(x):
        return None
    parts = [predictor.predict(np.asarray(x[i:i + SCORE_ROWS]), SCORE_ROWS, "validation rows")
             for i in range(0, len(x), SCORE_ROWS)]
    fields = ("labels", "probabilities", "logits", "values")
    return Prediction(**{f: None if getattr(parts[0], f) is None else
                         np.concatenate([getattr(p, f) for p in parts]) for f in fields})


def test_metrics(pred: Prediction, y: np.ndarray) -> dict:
    """The graph's own score (`pred`, its prediction) on the labelled test rows."""
    if pred.values is not None:
        return {"test/mae_onnx": float(np.abs(pred.values - y).mean())}
    return {"test/acc_onnx": float((pred.labels == y).mean())}


# How far a logit measured during training may be from the float32 graph's: float32
# reordering, or the rounding of the mixed precision the run validated in (bf16 keeps 8
# bits of mantissa, fp16 11).
METRIC_MARGIN = {"bf16": 0.1, "16": 0.02}


def metric_margin(ckpt: dict, atol: float | None, variant: str) -> float:
    """The logit tolerance the consistency gate allows for the precision the run used."""
    precision = str((ckpt.get("hardware") or {}).get("precision", "32"))
    for prefix, margin in METRIC_MARGIN.items():
        if precision.startswith(prefix):
            return margin
    return DEFAULT_ATOL["fp32"] if atol is None or variant != "fp32" else atol


def _score(val: Prediction, y: np.ndarray, regression: bool) -> float:
    """The graph's validation metric: MAE, or accuracy."""
    if regression:
        return float(np.abs(val.values - y).mean())
    return float((val.logits.argmax(1) == y).mean())


def consistency_check(val: Prediction | None, ckpt: dict, data: HeldOut, margin: float,
                      source: str) -> Consistency:
    """The float32 graph (its scores `val` on the validation split) must score what the
    checkpoint recorded
    for the same weights: accuracy up to the rows whose top-1 could flip by float
    reordering (logit margin below 2 x `margin`, the parity tolerance) or that the run did
    not score (DDP trims a split to a multiple of the world size); MAE up to `margin`."""
    metrics, regression = ckpt.get("metrics", {}), checkpoint_data(ckpt).regression
    key = "val/mae" if regression else "val/acc"
    if key not in metrics or not data.val_is_split or val is None:
        # nothing recorded to check against (a run that never validated): the graph's own
        # score still goes to the baseline gate, which let a model at chance through
        graph = None if val is None or not data.val_is_split else \
            _score(val, data.val_y, regression)
        return Consistency(checked=False, reason=f"no recorded {key} for the whole validation "
                           f"split" if data.val_is_split else "validation split not available "
                           "(--samples)", metric=None if graph is None else key, graph=graph)
    validated, step = ckpt.get("validated_at_step"), int(ckpt.get("global_step", 0))
    if validated is not None and validated != step:
        raise ParityError(f"{source}: its {key} was measured at step {validated} but its weights "
                          f"are from step {step} (saved mid-epoch); export a checkpoint saved at "
                          f"an epoch end, or resume the run to finish the epoch; nothing written")
    y, out = data.val_y, val.values if regression else val.logits
    rows, recorded = len(y), float(metrics[key])
    rows_recorded = int(round(metrics.get("val/samples", rows)))
    graph = _score(val, y, regression)
    if regression:
        allowed = margin + 1e-5 * abs(recorded)
        ok = rows_recorded == rows and abs(graph - recorded) <= allowed
        detail = f"allowed difference {allowed:.2g}"
    else:
        correct = round(graph * rows)
        top2 = np.sort(out, axis=1)[:, -2:] if out.shape[1] > 1 else np.zeros((rows, 2))
        near_ties = int((top2[:, 1] - top2[:, 0] < 2 * margin).sum())
        allowed = near_ties + abs(rows - rows_recorded)
        ok = abs(correct - round(recorded * rows_recorded)) <= allowed
        detail = f"allowed difference {allowed} rows"
    result = Consistency(checked=True, metric=key, recorded=recorded, graph=graph, rows=rows,
                         rows_recorded=rows_recorded, allowed=allowed)
    if not ok:
        raise ParityError(f"{source}: the exported graph scores {key}={graph:.4f} on the {rows} "
                          f"validation rows, but the checkpoint recorded {recorded:.4f} on "
                          f"{rows_recorded} rows for the same weights ({detail}); its weights and "
                          f"metrics disagree; nothing written")
    return result


def baseline_check(consistency: Consistency, val_y: np.ndarray, card: Card, allow: bool,
                   source: str) -> Baseline:
    """The best constant answer's score on the validation split (its most common class; its
    median target, for MAE) beside the graph's own, which `consistency` measured. A model
    that does not beat it is refused, unless `allow`: it would answer as if it had learned
    nothing (an EMA whose horizon is longer than the run exports one at chance)."""
    if consistency.graph is None:
        return Baseline(checked=False, reason=consistency.reason)
    y, graph, key = np.asarray(val_y), float(consistency.graph), consistency.metric
    if card.regression:
        answer = float(np.median(y))
        constant = float(np.abs(y - answer).mean())
        better, said = graph < constant, f"{answer:.4g}"
    else:
        counts = np.bincount(y.astype(np.int64))
        top = int(counts.argmax())
        constant = float(counts[top] / len(y))
        better, said = round(graph * len(y)) > counts[top], f"class {card.class_names[top]!r}"
    line = (f"{key} {graph:.4f} on {len(y)} validation rows vs {constant:.4f} for always "
            f"answering {said}")
    if not better and not allow:
        raise TrivialModelError(
            f"{source}: the model is no better than a constant answer ({line}); not exported "
            f"(--export.allow_trivial true, or trainer export --allow-trivial, exports it)")
    if not better:
        print(f"export: WARNING: the model is no better than a constant answer ({line}); "
              f"exported because it was allowed", file=sys.stderr)
    return Baseline(checked=True, metric=key, model=graph, constant=constant,
                    constant_answer=said, better=bool(better))


PARITY_SMALL_ROWS = 32  # samples compared at batch sizes 1 and 7 too


def _torch_outputs(frozen: nn.Module, x: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        return [o.numpy() for o in frozen(torch.from_numpy(x))]


def _top1(out: np.ndarray) -> np.ndarray:
    """Predicted class per row; for regression (N,) values there is nothing to agree on."""
    return out.argmax(-1) if out.ndim == 2 else np.zeros(len(out), np.int64)


def parity_check(frozen: nn.Module, graph: Predictor, samples: np.ndarray,
                 atol: float) -> Parity:
    """Run onnxruntime and torch on the same samples at batch sizes 1, an odd size and all;
    raise ParityError if any logit or (calibrated) probability, or regression value, differs
    by more than `atol`. Every sample is compared in the whole batch; the small batches,
    which check the graph's batch axis, take the first PARITY_SMALL_ROWS: each call pays
    torch's and onnxruntime's fixed overhead, and small batches over all the samples were
    most of the gate's time (docs/benchmarks.md)."""
    n = len(samples)
    sizes = sorted({1, min(7, n), n})
    worst, agree = 0.0, []
    for bs in sizes:
        stop = n if bs == n else min(n, PARITY_SMALL_ROWS)
        for start in range(0, stop, bs):
            x = samples[start:start + bs]
            pred = graph.predict(x, bs, "parity samples")
            got = [pred.values] if graph.regression else [pred.logits, pred.probabilities]
            ref = _torch_outputs(frozen, x)
            for g, r in zip(got, ref):
                worst = max(worst, float(np.abs(g.astype(np.float32) - r).max()))
            agree.append(_top1(got[0]) == _top1(ref[0]))
    result = Parity(samples=int(n), batch_sizes=tuple(sizes), max_abs_diff=worst,
                    top1_agreement=float(np.concatenate(agree).mean()),
                    atol=atol if np.isfinite(atol) else None)  # None: gated by accuracy (INT8)
    if not worst <= atol:
        raise ParityError(f"parity check failed: max |onnx - torch| output difference {worst:.3g} "
                          f"exceeds --atol {atol:g} on {n} held-out samples; nothing written")
    return result


def quantization_check(fp32: Prediction, int8: Prediction, val_y: np.ndarray,
                       max_drop: float) -> Quantization:
    """The INT8 graph's validation accuracy against the float32 graph's (both scored once)."""
    base = float((fp32.labels == val_y).mean())
    quant = float((int8.labels == val_y).mean())
    drop = 100.0 * (base - quant)
    result = Quantization(val_accuracy_fp32=base, val_accuracy_int8=quant, drop_points=drop,
                          max_drop_points=max_drop, val_samples=len(val_y))
    if drop > max_drop:
        raise ParityError(f"int8 quantization lost {drop:.2f} accuracy points on {len(val_y)} "
                          f"validation samples ({base:.4f} -> {quant:.4f}), more than "
                          f"--max-accuracy-drop {max_drop:g}; nothing written")
    return result
