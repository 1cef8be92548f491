"""Deterministic, stratified splits: the same seed gives the same rows on any machine."""

from __future__ import annotations

import numpy as np

from trainer.data.records import places


def stratified_split(y: np.ndarray, fractions: list[float], seed: int) -> list[np.ndarray]:
    """Split row indices into len(fractions)+1 parts; part k gets fractions[k] of every
    class, the last part gets the rest. Each part is sorted, so it is a set, not an order.
    Each row's part is noted in one byte, a class at a time: a shuffle of the positions of
    the class's rows decides which position goes where (noted a byte a position), and those
    notes are laid onto the class's rows a block of labels at a time. Then each part is
    read from the notes. The rows are those of lists of every class's shuffled rows (~24
    bytes a row, 230 MB above the labels at 10 million rows), draw for draw, as int32
    indices below 2**31 rows; a class takes 5 bytes a row of it while it is drawn (its
    int32 order and its notes; a two-class or regression table's largest moment), where
    its int64 rows, permutation and gather took 24 and int32 rows and order 8."""
    rng = np.random.default_rng(seed)
    part = np.full(len(y), len(fractions), np.int8)
    index = places(len(y))  # int32, 4 bytes a row, below 2**31 rows
    for cls, count in _classes(y):
        order = np.arange(count, dtype=index)
        rng.shuffle(order)  # rng.permutation(count): the same draws, in 4 bytes a row
        mine, start = np.full(count, len(fractions), np.int8), 0
        for k, frac in enumerate(fractions):
            take = int(round(frac * count))
            mine[order[start:start + take]] = k
            start += take
        del order
        j = 0
        for a in range(0, len(y), BLOCK):  # the class's j-th row gets mine[j]
            rows = y[a:a + BLOCK] == cls
            got = int(np.count_nonzero(rows))
            part[a:a + BLOCK][rows] = mine[j:j + got]
            j += got
        del mine
    sizes = np.zeros(len(fractions) + 1, np.int64)  # (a bincount of all: 8 bytes a row)
    for a in range(0, len(y), BLOCK):
        sizes += np.bincount(part[a:a + BLOCK], minlength=len(sizes))
    out = [np.empty(c, index) for c in sizes]
    at = [0] * len(out)
    for a in range(0, len(y), BLOCK):  # a block at a time: no int64 rows or masks of all
        block = part[a:a + BLOCK]
        for k, rows in enumerate(out):
            mine = np.flatnonzero(block == k)
            rows[at[k]:at[k] + len(mine)] = mine + a
            at[k] += len(mine)
    return out


def _classes(y: np.ndarray) -> list[tuple]:
    """(class, count) for each distinct value of `y`, ascending, as np.unique counts them,
    a block at a time (np.unique of all sorted a copy: 3 bytes a row of int8 labels)."""
    values, counts = [], []
    for a in range(0, len(y), BLOCK):
        v, c = np.unique(y[a:a + BLOCK], return_counts=True)
        values.append(v)
        counts.append(c)
    if not values:
        return []
    classes, where = np.unique(np.concatenate(values), return_inverse=True)
    totals = np.bincount(where, weights=np.concatenate(counts), minlength=len(classes))
    return list(zip(classes, totals.astype(np.int64).tolist()))


BLOCK = 1 << 16  # rows of the notes read together (an int64 row number each at most)
