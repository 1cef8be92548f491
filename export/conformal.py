"""How far to trust each answer: the card's calibration record and split conformal
prediction, applied where the model is deployed (numpy only, no torch).

At export (trainer/calibration.py) a classifier's probabilities are temperature-scaled on
half of the validation rows, and the other half's conformity scores are stored, sorted, in
the card. Given a coverage 1 - alpha, the threshold is the ceil((n + 1)(1 - alpha))-th
smallest of the n scores, and the prediction set of a row holds every class whose score
is within it: for exchangeable rows, the true class is in the set with probability at least
1 - alpha (Vovk et al. 2005; Angelopoulos and Bates, "A gentle introduction to conformal
prediction", 2021).

Classifiers use LAC, the score 1 - p(true class) (Sadinle, Lei and Wasserman 2019, "least
ambiguous set-valued classifiers"): of the split conformal methods it gives the smallest
sets on average for a given coverage, it is deterministic, and it needs nothing but the
probabilities the graph already returns. APS (cumulative probability mass) adapts the set
size to each row's difficulty but needs randomisation to be exact and gives larger sets
on average; we chose the smaller sets. A LAC set may be empty: no class is plausible
enough, which marks an input unlike the calibration rows. Coverage is marginal (over rows),
not per class. Regressors store absolute residuals |y - value|: the interval is value -/+
the threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from export.errors import InputError
from export.records import Record, entry, is_dict, is_num, is_str, list_of, one_of

METHODS = {"classification": "lac", "regression": "absolute_residual"}
ECE_BINS = 15


@dataclass(frozen=True, kw_only=True)
class Quality(Record):
    """How well probabilities match outcomes on some rows: expected calibration error (15
    equal-width confidence bins), negative log-likelihood and Brier score (lower is better)."""

    rows: int = entry(is_num, "a number")
    ece: float = entry(is_num, "a number")
    nll: float = entry(is_num, "a number")
    brier: float = entry(is_num, "a number")


@dataclass(frozen=True, kw_only=True)
class Calibration(Record):
    """The temperature in the graph (classifiers) and the sorted conformity scores of rows
    it was not fitted on, with the quality of the probabilities before and after."""

    method: str = entry(one_of(*METHODS.values()), "lac or absolute_residual")
    scores: tuple[float, ...] = entry(list_of(is_num), "a sorted list of conformity scores")
    temperature: float | None = entry(lambda v: is_num(v) and v > 0, "a number > 0", None)
    fit_rows: int = entry(is_num, "a number", 0)
    seed: int | None = entry(is_num, "a number", None)
    fit_before: Quality | None = entry(None, "an object", None, record=Quality)
    fit_after: Quality | None = entry(None, "an object", None, record=Quality)
    test_before: Quality | None = entry(None, "an object", None, record=Quality)
    test_after: Quality | None = entry(None, "an object", None, record=Quality)
    reliability: dict | None = entry(is_dict, "an object of bins", None)
    note: str | None = entry(is_str, "a note", None)

    def validate(self, source: str) -> None:
        s = np.asarray(self.scores, np.float64)
        if not len(s) or not np.isfinite(s).all() or (np.diff(s) < 0).any():
            raise InputError(f"{source}: model card field 'calibration.scores' must be a "
                             f"non-empty sorted list of finite numbers")


def check_coverage(coverage, name: str = "--coverage") -> float:
    if not (isinstance(coverage, (int, float)) and not isinstance(coverage, bool)
            and 0 < coverage < 1):
        raise InputError(f"{name} {coverage}: expected a number between 0 and 1, exclusive "
                         f"(0.9 asks for answers that hold the true one 90% of the time)")
    return float(coverage)


def threshold(calibration: Calibration | None, coverage: float, source: str,
              name: str = "--coverage") -> float:
    """The conformal threshold for `coverage` (the finite-sample quantile of the scores)."""
    coverage = check_coverage(coverage, name)
    if calibration is None:
        raise InputError(f"{source}: exported without conformal scores; export it again "
                         f"with this version (trainer export) to ask for a coverage")
    n = len(calibration.scores)
    k = math.ceil((n + 1) * coverage)
    if k > n:
        raise InputError(f"{name} {coverage}: the model's {n} calibration rows support "
                         f"a coverage of at most {n / (n + 1):.4f}")
    return float(calibration.scores[k - 1])


def set_mask(probabilities: np.ndarray, qhat: float) -> np.ndarray:
    """(rows, classes) booleans: class k is in row i's set when 1 - p_ik <= qhat."""
    return (1.0 - probabilities.astype(np.float64)) <= qhat


def set_columns(probabilities: np.ndarray, qhat: float, class_names) -> dict[str, list]:
    """prediction_set (class names, most likely first, joined by |) and set_size."""
    mask = set_mask(probabilities, qhat)
    order = np.argsort(-probabilities, axis=1, kind="stable")
    sets = ["|".join(class_names[k] for k in row_order if row_mask[k])
            for row_order, row_mask in zip(order, mask)]
    return {"prediction_set": sets, "set_size": [int(s) for s in mask.sum(1)]}


def interval_columns(values: np.ndarray, qhat: float) -> dict[str, list]:
    """lower and upper: the value -/+ the residual threshold."""
    v = values.astype(np.float64)
    return {"lower": [float(x) for x in v - qhat], "upper": [float(x) for x in v + qhat]}


def coverage_sums(probabilities: np.ndarray | None, values: np.ndarray | None,
                  y: np.ndarray, qhat: float) -> dict[str, float]:
    """Additive sums for the empirical coverage and the mean set size (or interval width)."""
    if values is not None:
        covered = np.abs(values.astype(np.float64) - y) <= qhat
        return {"covered": int(covered.sum()), "width": float(2 * qhat * len(y))}
    mask = set_mask(probabilities, qhat)
    covered = mask[np.arange(len(y)), y.astype(np.int64)]
    return {"covered": int(covered.sum()), "set_size": int(mask.sum())}


def coverage_metrics(sums: dict[str, float]) -> dict[str, float]:
    n = sums.get("n")
    if not n or "covered" not in sums:
        return {}
    out = {"coverage": sums["covered"] / n}
    if "set_size" in sums:
        out["mean_set_size"] = sums["set_size"] / n
    if "width" in sums:
        out["mean_interval_width"] = sums["width"] / n
    return out
