"""Statistics of the training split: the normalisation the model bakes in, and a
description of the training data (per-channel histograms, class counts or target
quantiles) kept in the model card. The drift tests compare batches with the validation
split's per-row summaries instead (export/drift.py, computed at export)."""

from __future__ import annotations

import numpy as np

from export.drift import bin_counts, bin_index
from trainer.data.dataset import Split

HIST_BINS = 32
MAX_ROWS = 100_000  # above this, statistics come from a seeded sample of rows


def _hist(values: np.ndarray, lo: float, hi: float) -> list[float]:
    """Bin frequencies over `HIST_BINS` equal bins of [lo, hi]."""
    counts = bin_counts(values, lo, hi, HIST_BINS)
    return (counts / max(1, counts.sum())).tolist()


def _channel_moments(split: Split, lo: float, hi: float):
    """Per channel or feature: mean, std and histogram counts over the split."""
    if split.x.dtype == np.uint8:  # images
        return _moments_of_counts(_byte_counts(split), lo, hi)
    return _float_moments(split, lo, hi)


def _byte_counts(split: Split) -> np.ndarray:
    """(C, 256): how often each byte value occurs in each channel, chunk by chunk."""
    counts = np.zeros((split.x.shape[1], 256), np.int64)
    for x, _ in split.chunks(rows=max(1, split.chunk_rows // 8)):  # bincount's int64 copy
        per = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
        counts += np.stack([np.bincount(channel, minlength=256) for channel in per])
    return counts


def _moments_of_counts(counts: np.ndarray, lo: float, hi: float):
    """Mean, std and histogram of byte values from their counts: exact, with the bins of
    the general pass, and without its float64 temporaries of every value (the general pass
    over the data was most of a fit's data phase for images)."""
    values = np.arange(256, dtype=np.float64)
    n = np.maximum(1, counts.sum(axis=1))
    mean = counts @ values / n
    var = (counts * (values[None] - mean[:, None]) ** 2).sum(axis=1) / n
    bins = bin_index(np.arange(256, dtype=np.uint8), lo, hi, HIST_BINS)
    hist = np.stack([np.bincount(bins, weights=c, minlength=HIST_BINS) for c in counts])
    return mean, np.sqrt(var), hist.astype(np.int64)


def _float_moments(split: Split, lo: float, hi: float):
    """Mean, std (float64, merged chunk by chunk as Chan et al.'s parallel variance, so no
    float64 copy of the data and no cancellation) and histogram counts, over the split in
    ~CHUNK_BYTES pieces."""
    n, mean, m2, hist = 0, None, None, None
    for x, _ in split.chunks(rows=max(1, split.chunk_rows // 16)):  # float64 temporaries
        per = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)  # (C, n*H*W) or (F, n)
        k = per.shape[1]
        c_mean = per.mean(axis=1, dtype=np.float64)
        c_m2 = np.zeros_like(c_mean)
        for c in range(len(per)):  # one channel at a time: a float64 copy of one channel
            c_m2[c] = np.square(per[c] - c_mean[c], dtype=np.float64).sum()
        counts = np.stack([bin_counts(row, lo, hi, HIST_BINS) for row in per])
        if mean is None:
            n, mean, m2, hist = k, c_mean, c_m2, counts
            continue
        delta, total = c_mean - mean, n + k
        mean = mean + delta * (k / total)
        m2 = m2 + c_m2 + delta ** 2 * (n * k / total)
        n, hist = total, hist + counts
    return mean, np.sqrt(m2 / max(1, n)), hist


def training_stats(split: Split, num_classes: int, value_range: tuple[float, float],
                   seed: int = 0) -> dict:
    """Per channel (images: N,C,H,W) or per feature (tabular: N,F): mean, std and a histogram
    over `value_range`; class frequencies (classification) or target statistics
    (regression). JSON-ready lists. Memory: one chunk of the split at a time."""
    if len(split) > MAX_ROWS:
        rows = np.sort(np.random.default_rng(seed).choice(len(split), MAX_ROWS, replace=False))
        split = split.subset(rows)
    y = np.asarray(split.y)  # at most MAX_ROWS
    lo, hi = float(value_range[0]), float(value_range[1])
    hi = hi if hi > lo else lo + 1.0
    mean, std, hist = _channel_moments(split, lo, hi)
    stats = {
        "mean": mean.tolist(),
        "std": np.where(std > 1e-6, std, 1.0).tolist(),  # a constant channel must not divide by 0
        "histogram": {"range": [lo, hi], "bins": HIST_BINS,
                      "frequencies": (hist / np.maximum(1, hist.sum(1, keepdims=True))).tolist()},
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


def class_rows(split: Split, num_classes: int) -> np.ndarray:
    """How many rows of each class `split` holds, its labels read a block at a time (a
    streamed split's labels are read through its notes, never whole)."""
    counts = np.zeros(num_classes, np.int64)
    for a in range(0, len(split), 1 << 16):
        counts += np.bincount(np.asarray(split.y[a:a + (1 << 16)]), minlength=num_classes)
    return counts
