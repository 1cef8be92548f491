"""Deterministic, stratified splits: the same seed gives the same rows on any machine."""

from __future__ import annotations

import numpy as np


def stratified_split(y: np.ndarray, fractions: list[float], seed: int) -> list[np.ndarray]:
    """Split row indices into len(fractions)+1 parts; part k gets fractions[k] of every
    class, the last part gets the rest. Each part is sorted, so it is a set, not an order."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for cls in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == cls))
        start = 0
        for k, frac in enumerate(fractions):
            take = int(round(frac * len(rows)))
            parts[k].append(rows[start:start + take])
            start += take
        parts[-1].append(rows[start:])
    return [np.sort(np.concatenate(p)) for p in parts]
