"""Read-only one-dimensional arrays whose values are read when indexed, not held: a split's
part read through its notes (split.Picked) and a table's labels read from its cached target
column (`Labels`). What the code reads a split's `y` and `rows` by is numpy's: len, slices,
integer arrays (any order, negative ones from the end), one index, np.asarray, dtype."""

from __future__ import annotations

import operator

import numpy as np


class LazyArray:
    """A subclass gives len, dtype, `_span(start, stop)` (a range, 0 <= start <= stop <=
    len) and `_at(positions)` (any positions within the array, checked); each returns a new
    array of values the caller may change."""

    ndim = 1

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def dtype(self) -> np.dtype:
        raise NotImplementedError

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def tolist(self) -> list:
        return self[:].tolist()

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1:
                return self._span(start, max(start, stop))
            key = np.arange(start, stop, step)
        elif np.ndim(key) == 0:
            return self._at(self._checked(np.array([operator.index(key)])))[0]
        positions = self._checked(np.asarray(key))
        n, first = len(positions), int(positions[0]) if len(positions) else 0
        if n and int(positions[-1]) - first == n - 1 and (np.diff(positions) == 1).all():
            return self._span(first, first + n)  # a range: no search
        return self._at(positions)

    def _checked(self, positions: np.ndarray) -> np.ndarray:
        """Integer positions, negative ones counted from the end, each within the array."""
        if positions.dtype.kind not in "iu":
            raise IndexError(f"{type(self).__name__} takes integer positions, not "
                             f"{positions.dtype}")
        if not len(positions):
            return positions.astype(np.int64)
        positions = np.where(positions < 0, positions + len(self), positions)
        if positions.min() < 0 or positions.max() >= len(self):
            raise IndexError(f"positions beyond the {len(self)} of {type(self).__name__}")
        return positions

    def _span(self, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def _at(self, positions: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class Labels(LazyArray):
    """A table's labels read from its cached target `column` (a RowFile: pread, never held)
    when indexed: sample i's is column[rows[i]] (rows: None when the cache holds the table's
    rows in order), mapped to its class by `rank` (each stored code's class index), or as
    `dtype` (regression targets). Held where an array took a byte a row (4 for regression
    targets: 400 MB at 100 million rows); every read of a range of them is one read."""

    def __init__(self, column, rows: np.ndarray | None, n: int, dtype: np.dtype,
                 rank: np.ndarray | None = None):
        self.column, self.rows, self.n, self._dtype, self.rank = column, rows, n, dtype, rank

    def __len__(self) -> int:
        return self.n

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._dtype)

    def _values(self, stored: np.ndarray) -> np.ndarray:
        stored = np.asarray(stored)
        if self.rank is not None:
            return self.rank[stored.astype(np.int64)]
        return stored.astype(self.dtype)

    def _span(self, start: int, stop: int) -> np.ndarray:
        if self.rows is None:
            return self._values(self.column[start:stop])
        return self._values(self.column[self.rows[start:stop]])

    def _at(self, positions: np.ndarray) -> np.ndarray:
        return self._values(self.column[positions if self.rows is None else
                                        self.rows[positions]])
