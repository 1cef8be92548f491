"""Statistics of the training split: the normalisation the model bakes in, and a
description of the training data (per-channel histograms, class counts or target
quantiles) kept in the model card. The drift tests compare batches with the validation
split's per-row summaries instead (export/drift.py, computed at export)."""

from __future__ import annotations

import numpy as np

from export.drift import bin_counts
from trainer.data.dataset import Split

HIST_BINS = 32
MAX_ROWS = 100_000  # above this, statistics come from a seeded sample of rows


def _hist(values: np.ndarray, lo: float, hi: float) -> list[float]:
    """Bin frequencies over `HIST_BINS` equal bins of [lo, hi]."""
    counts = bin_counts(values, lo, hi, HIST_BINS)
    return (counts / max(1, counts.sum())).tolist()


def training_stats(split: Split, num_classes: int, value_range: tuple[float, float],
                   seed: int = 0) -> dict:
    """Per channel (images: N,C,H,W) or per feature (tabular: N,F): mean, std and a histogram
    over `value_range`; class frequencies (classification) or target statistics
    (regression). JSON-ready lists."""
    if len(split) > MAX_ROWS:
        rows = np.sort(np.random.default_rng(seed).choice(len(split), MAX_ROWS, replace=False))
        split = split.subset(rows)
    x, y = split.arrays()
    per = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)  # (C, N*H*W) or (F, N)
    lo, hi = float(value_range[0]), float(value_range[1])
    hi = hi if hi > lo else lo + 1.0
    mean = per.mean(axis=1, dtype=np.float64)
    std = per.std(axis=1, dtype=np.float64)
    stats = {
        "mean": mean.tolist(),
        "std": np.where(std > 1e-6, std, 1.0).tolist(),  # a constant channel must not divide by 0
        "histogram": {"range": [lo, hi], "bins": HIST_BINS,
                      "frequencies": [_hist(row, lo, hi) for row in per]},
        "samples": int(len(y)),
    }
    if num_classes:
        stats["class_counts"] = np.bincount(y, minlength=num_classes).tolist()
    else:
        t_lo, t_hi = float(y.min()), float(y.max())
        t_hi = t_hi if t_hi > t_lo else t_lo + 1.0
        stats["target"] = {"mean": float(y.mean()), "std": float(y.std()),
                           "quantiles": np.quantile(y, [0, 0.05, 0.25, 0.5, 0.75, 0.95, 1]).tolist(),
                           "histogram": {"range": [t_lo, t_hi], "bins": HIST_BINS,
                                         "frequencies": _hist(y, t_lo, t_hi)}}
    return stats
