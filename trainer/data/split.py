"""Deterministic, stratified splits: the same seed gives the same rows on any machine."""

from __future__ import annotations

import copy
import itertools
from collections import OrderedDict

import numpy as np

from trainer.data.lazy import LazyArray
from trainer.data.records import places


def stratified_split(y: np.ndarray, fractions: list[float], seed: int) -> list[np.ndarray]:
    """Split row indices into len(fractions)+1 parts; part k gets fractions[k] of every
    class, the last part gets the rest. Each part is sorted, so it is a set, not an order.
    The parts as arrays of rows (int32 below 2**31 rows), read from `split_notes`; a fit
    reads them through the notes instead (`Picked`), without these arrays."""
    notes = split_notes(y, fractions, seed)
    return [np.asarray(Picked(notes, k)) for k in range(len(fractions) + 1)]


def split_notes(y: np.ndarray, fractions: list[float], seed: int) -> np.ndarray:
    """Each row's part of `stratified_split` noted in one byte (int8: k for part k).
    Each class's notes are drawn in turn, a byte a row of it: a shuffle of the positions of
    its rows decides which position goes where (`_shuffled`), or, for a class of more than
    LARGE rows, a block of positions at a time (`_in_blocks`). Then one pass over the labels
    lays them onto the rows, a block at a time, the block's rows grouped by class with a
    stable sort (a pass per class took 2.9 s for 1,000 classes at 8 million rows). The rows
    are those of lists of every class's shuffled rows (~24 bytes a row, 230 MB above the
    labels at 10 million rows), draw for draw, for classes up to LARGE rows; the peak is the
    notes drawn so far and one such class's shuffled int32 order (4 bytes a row of it, at
    most 64 MiB), then 2 bytes a row (the drawn notes and the rows' notes)."""
    rng = np.random.default_rng(seed)
    classes = _classes(y)
    counts = np.array([count for _, count in classes], np.int64)
    drawn, first = np.empty(len(y), np.int8), np.cumsum(counts) - counts  # class c's notes
    for c, count in enumerate(counts.tolist()):  # at drawn[first[c]:][:count]
        takes = [int(round(frac * count)) for frac in fractions]
        draw = _shuffled if count <= LARGE else _in_blocks
        draw(drawn[first[c]:first[c] + count], [*takes, count - sum(takes)], rng)
    values = np.array([value for value, _ in classes])
    part, taken = np.empty(len(y), np.int8), first.copy()  # class c: its notes taken so far
    narrow = np.int16 if len(classes) <= 1 << 15 else np.int64  # int16 sorts by radix
    for a in range(0, len(y), BLOCK):
        which = np.searchsorted(values, y[a:a + BLOCK]).astype(narrow)
        order = np.argsort(which, kind="stable")
        which = which[order]  # each row's class, grouped
        here = np.bincount(which, minlength=len(classes))
        within = np.arange(len(which)) - (np.cumsum(here) - here)[which]
        part[a + order] = drawn[taken[which] + within]
        taken += here
    return part


def _shuffled(mine: np.ndarray, takes: list[int], rng: np.random.Generator) -> None:
    """Note takes[k] of the positions for part k: a shuffle of the positions (the first
    takes[0] go to part 0, ...; rng.permutation's draws, in an int32 order)."""
    order = np.arange(len(mine), dtype=places(len(mine)))
    rng.shuffle(order)  # rng.permutation(count): the same draws, in 4 bytes a position
    for k, start in enumerate(np.cumsum([0, *takes[:-1]]).tolist()):
        mine[order[start:start + takes[k]]] = k


def _in_blocks(mine: np.ndarray, takes: list[int], rng: np.random.Generator) -> None:
    """The same as `_shuffled` in distribution (every placing of takes[k] notes k equally
    likely), a block of positions at a time: how many of each part fall in a block is a
    multivariate hypergeometric draw from what is left, then the block's notes are shuffled.
    No order of every position: a stratum of 100 million rows took 400 MB for it."""
    left = np.array(takes, np.int64)
    for a in range(0, len(mine), LARGE):
        here = rng.multivariate_hypergeometric(left, min(LARGE, len(mine) - a))
        block = np.repeat(np.arange(len(left), dtype=np.int8), here)
        rng.shuffle(block)
        mine[a:a + len(block)] = block
        left -= here


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


LARGE = 1 << 24  # a class's rows beyond which its notes are drawn a block at a time
BLOCK = 1 << 16  # rows of the notes read together (at most 2**16: Picked keeps uint16 offsets)


class Picked(LazyArray):
    """The rows of one part of a split, read from the split's notes (`split_notes`):
    picked[i] is the i-th row noted `code`, or then[that row] with `then` (the dataset's
    labels, or its map from samples to rows of x). An int array for reading (len, slices,
    integer arrays, np.asarray): one byte a row shared by every part (the notes) where a
    part's int32 rows took 4 and its labels 1 more (5 bytes a row of every fit's dataset,
    40 MB at 8 million rows). Rows are found a block of notes at a time: how many of each
    block's rows are picked is counted once (8 bytes a block), which they are is kept for
    the last KEEP blocks read (2 bytes a row of them, ~4 MiB)."""

    KEEP = 32

    def __init__(self, notes: np.ndarray, code: int, then: np.ndarray | None = None):
        self.notes, self.code, self.then = notes, code, then
        counts = [np.count_nonzero(notes[a:a + BLOCK] == code)
                  for a in range(0, len(notes), BLOCK)]
        self._before = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._index = places(len(notes))
        self._kept: OrderedDict[int, np.ndarray] = OrderedDict()
        self._last: list = []  # the last positions read and their rows (Split.subset reads
        # a part's labels and its rows for the same samples: the rows are found once)

    def through(self, then: np.ndarray | None) -> Picked:
        """The same rows read through `then` (sharing the counts and the blocks kept)."""
        out = copy.copy(self)
        out.then = then
        return out

    def __len__(self) -> int:
        return int(self._before[-1])

    @property
    def dtype(self) -> np.dtype:
        return self._index if self.then is None else self.then.dtype

    def _span(self, start: int, stop: int) -> np.ndarray:
        rows = self._rows_span(start, stop)
        return rows if self.then is None else self.then[rows]

    def _at(self, positions: np.ndarray) -> np.ndarray:
        rows = self._rows_at(positions)
        return rows if self.then is None else self.then[rows]

    def _offsets(self, b: int, keep: bool = True) -> np.ndarray:
        """Where block b's picked rows lie in it (uint16: a block is 2**16 rows), kept
        for the next reads with `keep`."""
        kept = self._kept.get(b)
        if kept is None:
            notes = self.notes[b * BLOCK:(b + 1) * BLOCK]
            kept = np.flatnonzero(notes == self.code).astype(np.uint16)
            if not keep:
                return kept
            self._kept[b] = kept
            if len(self._kept) > self.KEEP:
                self._kept.popitem(last=False)
        else:
            self._kept.move_to_end(b)
        return kept

    def _rows_span(self, start: int, stop: int) -> np.ndarray:
        """The rows of positions start..stop-1, block after block (kept when the span is
        a reader's block or a batch, not a chunk of a pass or the whole part)."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"positions {start}..{stop - 1} beyond the part's {len(self)} rows")
        out, at, keep = np.empty(stop - start, self._index), 0, stop - start <= BLOCK
        b = int(np.searchsorted(self._before, start, "right")) - 1
        while at < len(out):
            first = int(self._before[b])
            offsets = self._offsets(b, keep)
            lo, hi = max(start - first, 0), min(stop - first, len(offsets))
            out[at:at + hi - lo] = offsets[lo:hi]
            out[at:at + hi - lo] += b * BLOCK
            at, b = at + hi - lo, b + 1
        return out

    def _rows_at(self, positions: np.ndarray) -> np.ndarray:
        """The rows of `positions` (checked, any order), grouped by their block of notes."""
        last = self._last
        if last and np.array_equal(last[0], positions):
            return last[1].copy()
        n = len(positions)
        out = np.empty(n, self._index)
        if not n:
            return out
        blocks = np.searchsorted(self._before, positions, "right") - 1
        order = np.argsort(blocks, kind="stable") if (blocks[1:] < blocks[:-1]).any() else None
        ordered = blocks if order is None else blocks[order]
        cuts = [0, *(np.flatnonzero(ordered[1:] != ordered[:-1]) + 1).tolist(), n]
        for s, e in itertools.pairwise(cuts):
            b, mine = int(ordered[s]), slice(s, e) if order is None else order[s:e]
            out[mine] = self._offsets(b)[positions[mine] - self._before[b]]
            out[mine] += b * BLOCK
        last[:] = positions, out.copy()
        return out
