"""Calibration at export: a temperature for the graph's probabilities and the conformity
scores for prediction sets (export/conformal.py applies them where the model is deployed).

The validation rows the gates already scored through the graph are split in two, seeded:
the temperature T > 0 minimises the negative log-likelihood of softmax(logits / T) on the
first half (Guo et al. 2017, "On calibration of modern neural networks"; NLL is convex in
1/T, so a bounded 1-D search finds its minimum), and the second half's LAC scores
1 - p(true class) under T are stored sorted. Regressors store the absolute residuals of
every validation row. numpy and scipy only; nothing here needs torch.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from export.conformal import ECE_BINS, METHODS, Calibration, Quality

T_BOUNDS = (0.05, 20.0)  # a temperature outside means the logits carry no usable scale
MIN_ROWS = 20  # validation rows below which nothing is fitted (each half needs rows)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """float32 probabilities, as the graph computes them."""
    return np.exp(log_softmax(logits.astype(np.float64) / temperature, axis=1)).astype(np.float32)


def _bins(probs: np.ndarray, y: np.ndarray):
    conf = probs.max(1).astype(np.float64)
    right = (probs.argmax(1) == y).astype(np.float64)
    which = np.minimum((conf * ECE_BINS).astype(np.int64), ECE_BINS - 1)  # 1.0: the last bin
    count = np.bincount(which, minlength=ECE_BINS)
    safe = np.maximum(count, 1)
    return (count, np.bincount(which, conf, ECE_BINS) / safe,
            np.bincount(which, right, ECE_BINS) / safe)


def quality(probs: np.ndarray, y: np.ndarray) -> Quality:
    """ECE over 15 equal-width bins of the top-class confidence, mean NLL of the true class
    and the multi-class Brier score (mean over rows of the summed squared errors)."""
    y = y.astype(np.int64)
    count, conf, acc = _bins(probs, y)
    p = probs.astype(np.float64)
    true = p[np.arange(len(y)), y]
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return Quality(rows=len(y), ece=float((count * np.abs(acc - conf)).sum() / len(y)),
                   nll=float(-np.log(np.maximum(true, 1e-12)).mean()),
                   brier=float(((p - onehot) ** 2).sum(1).mean()))


def reliability(before: np.ndarray, after: np.ndarray, y: np.ndarray, rows: str) -> dict:
    """Per-bin row count, mean confidence and accuracy, before and after: the diagram."""
    def side(probs):
        count, conf, acc = _bins(probs, y.astype(np.int64))
        return {"count": count.tolist(), "confidence": np.round(conf, 6).tolist(),
                "accuracy": np.round(acc, 6).tolist()}

    return {"rows": rows, "bins": ECE_BINS, "before": side(before), "after": side(after)}


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The T in T_BOUNDS minimising the mean NLL of softmax(logits / T); deterministic."""
    z, y = logits.astype(np.float64), y.astype(np.int64)

    def nll(log_t: float) -> float:
        return float(-log_softmax(z / math.exp(log_t), axis=1)[np.arange(len(y)), y].mean())

    lo, hi = (math.log(b) for b in T_BOUNDS)
    best = minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
    return float(math.exp(best.x))


def calibrate(task: str, val, val_y: np.ndarray, *, seed: int = 0,
              temperature: bool = True) -> Calibration | None:
    """The card's calibration record from the graph's raw outputs on the validation rows
    (`val`, a Prediction); None (said on stderr) for too few rows. `with_test` adds the
    test split's figures once the final graph has scored it."""
    n = len(val_y)
    if n < MIN_ROWS:
        print(f"export: calibration skipped: {n} validation rows, at least {MIN_ROWS} needed",
              file=sys.stderr)
        return None
    if task == "regression":
        scores = np.abs(val.values.astype(np.float64) - val_y)
        return Calibration(method=METHODS[task], scores=_sorted(scores), seed=seed)
    order = np.random.default_rng(seed).permutation(n)
    fit, held = order[: n // 2], order[n // 2:]
    logits, y = val.logits, val_y.astype(np.int64)
    t, note = _temperature(logits[fit], y[fit]) if temperature else \
        (1.0, "temperature scaling off (calibrate false)")
    probs = softmax(logits[held], t)
    scores = 1.0 - probs[np.arange(len(held)), y[held]].astype(np.float64)
    before, after = softmax(logits[fit]), softmax(logits[fit], t)
    return Calibration(
        method=METHODS[task], scores=_sorted(scores), fit_rows=len(fit), seed=seed,
        temperature=None if note else t, fit_before=quality(before, y[fit]),
        fit_after=quality(after, y[fit]),
        reliability=reliability(before, after, y[fit], "temperature fit"), note=note)


def _temperature(logits: np.ndarray, y: np.ndarray) -> tuple[float, str | None]:
    """The fitted temperature, or 1 and why not: when every fit row is right, the NLL keeps
    falling as T -> 0 (seen on wine's 26 fit rows: T = 0.05, the bound), and a T at either
    bound is the search's edge, not a measurement."""
    lo, hi = T_BOUNDS
    if (logits.argmax(1) == y).all():
        return 1.0, (f"temperature not fitted: the model gets all {len(y)} fit rows right, "
                     f"so their likelihood keeps rising as T -> 0; kept T=1")
    t = fit_temperature(logits, y)
    if lo * 1.01 < t < hi / 1.01:
        return t, None
    return 1.0, f"temperature not fitted: the search stopped at its bound T={t:.3g}; kept T=1"


def with_test(calibration: Calibration | None, test, test_y: np.ndarray | None):
    """`calibration` with the test split's quality before and after and its diagram."""
    if calibration is None or calibration.fit_rows == 0 or test is None or test_y is None \
            or not len(test_y):
        return calibration
    t = calibration.temperature or 1.0
    raw, scaled, y = softmax(test.logits), softmax(test.logits, t), test_y.astype(np.int64)
    return dataclasses.replace(calibration, test_before=quality(raw, y),
                               test_after=quality(scaled, y),
                               reliability=reliability(raw, scaled, y, "test"))


def _sorted(scores: np.ndarray) -> tuple[float, ...]:
    # 9 significant digits round-trip float32 through JSON; sorting after rounding keeps order
    return tuple(sorted(float(f"{s:.9g}") for s in scores))
