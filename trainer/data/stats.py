"""Statistics of the training split: the normalisation the model bakes in, and the
reference that deployment compares its batches against to detect drift."""

from __future__ import annotations

import numpy as np

HIST_BINS = 32


def training_stats(x: np.ndarray, y: np.ndarray, num_classes: int,
                   value_range: tuple[float, float]) -> dict:
    """Per channel (images: x is N,C,H,W) or per feature (tabular: x is N,F): mean, std,
    a histogram over `value_range`; plus the class frequencies. JSON-ready lists."""
    # Put the channel/feature axis first and flatten the rest: (C, N*H*W) or (F, N).
    per = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
    lo, hi = float(value_range[0]), float(value_range[1])
    if hi <= lo:
        hi = lo + 1.0
    mean = per.mean(axis=1, dtype=np.float64)
    std = per.std(axis=1, dtype=np.float64)
    hist = [np.histogram(row, bins=HIST_BINS, range=(lo, hi))[0] for row in per]
    counts = np.bincount(y, minlength=num_classes)
    return {
        "mean": mean.tolist(),
        # A constant channel must not divide by zero in the graph.
        "std": np.where(std > 1e-6, std, 1.0).tolist(),
        "histogram": {"range": [lo, hi], "bins": HIST_BINS,
                      "frequencies": [(h / h.sum()).tolist() for h in hist]},
        "class_counts": counts.tolist(),
        "samples": int(len(y)),
    }
