"""Deterministic, stratified splits: the same seed gives the same rows on any machine."""

from __future__ import annotations

import numpy as np

from trainer.data.records import places


def stratified_split(y: np.ndarray, fractions: list[float], seed: int) -> list[np.ndarray]:
    """Split row indices into len(fractions)+1 parts; part k gets fractions[k] of every
    class, the last part gets the rest. Each part is sorted, so it is a set, not an order.
    Each row's part is noted in one byte, a class at a time (a shuffle of the class's rows
    decides which go where), then each part is read from those notes: ~3 bytes a row while
    it runs where lists of every class's rows and their sort took ~24 (10 million rows: 230
    MB above the labels). The rows are those of that way, draw for draw, as int32 indices
    below 2**31 rows. A class's rows and their shuffled order are int32 too (8 bytes a row
    of the class while it is drawn, where int64 rows, permutation and gather took 24: a
    two-class or regression table's largest moment)."""
    rng = np.random.default_rng(seed)
    part = np.full(len(y), len(fractions), np.int8)
    index = places(len(y))  # int32, 4 bytes a row, below 2**31 rows
    for cls, count in zip(*np.unique(y, return_counts=True)):
        rows = _rows_of(y, cls, count, index)
        order = np.arange(len(rows), dtype=index)
        rng.shuffle(order)  # rng.permutation(len(rows)): the same draws, in 4 bytes a row
        start = 0
        for k, frac in enumerate(fractions):
            take = int(round(frac * len(rows)))
            part[rows[order[start:start + take]]] = k
            start += take
        del rows, order
    out = [np.empty(c, index) for c in np.bincount(part, minlength=len(fractions) + 1)]
    at = [0] * len(out)
    for a in range(0, len(y), BLOCK):  # a block at a time: no int64 rows or masks of all
        block = part[a:a + BLOCK]
        for k, rows in enumerate(out):
            mine = np.flatnonzero(block == k)
            rows[at[k]:at[k] + len(mine)] = mine + a
            at[k] += len(mine)
    return out


def _rows_of(y: np.ndarray, cls, count: int, index: np.dtype) -> np.ndarray:
    """The rows labelled `cls`, ascending, as `index`, a block of labels at a time."""
    rows, at = np.empty(count, index), 0
    for a in range(0, len(y), BLOCK):
        mine = np.flatnonzero(y[a:a + BLOCK] == cls)
        rows[at:at + len(mine)] = mine + a
        at += len(mine)
    return rows


BLOCK = 1 << 20  # rows of the notes read together
