"""Files of equal content in one dataset. A source whose cache is keyed by content (image
folders, tables: `FixedDataset.history` is set) gives every copy of a file the same rows of
x, so the copies are known without reading a value. A copy in val or test of a training
file makes that score overstate accuracy on new inputs (and the calibration and the gate
built on it); one content under two classes trains two answers to one input. Where a split
is drawn (`--data.val_fraction`, `--data.test_fraction`), the copies of one content are kept
in the split of the first of them; where the user's folders give the splits, the copies
across them are counted; either way the card records them (`DatasetCopies`).

Memory: one byte a stored row to keep copies together; to count them, one, and one or two
for the first label of each row where labels come from folders (images: a stored row is a
whole image); the samples are read a block at a time."""

from __future__ import annotations

import numpy as np

from export.dataset_card import DatasetCopies
from trainer.data.dataset import Split

BLOCK = 1 << 16  # samples read together


def _blocks(n: int):
    return ((a, min(a + BLOCK, n)) for a in range(0, n, BLOCK))


def _rows(split: Split, a: int, b: int) -> np.ndarray:
    """The rows of x that samples a..b-1 of `split` read."""
    return np.arange(a, b) if split.rows is None else np.asarray(split.rows[a:b])


def keep_together(notes: np.ndarray, split: Split) -> int:
    """Give each sample of `split` the note (split.split_notes: its part) of the first
    sample that reads the same row of x, in place; how many samples moved."""
    if split.rows is None:  # every sample its own row: no copies
        return 0
    first = np.full(len(split.x), -1, np.int8)  # the note of each row's first sample
    seen = 0
    for a, b in _blocks(len(notes)):
        rows = _rows(split, a, b)
        fresh, at = np.unique(rows, return_index=True)
        unset = first[fresh] < 0
        first[fresh[unset]] = notes[a:b][at[unset]]
        seen += int(np.count_nonzero(unset))
    if seen == len(notes):  # as many rows as samples: no copies
        return 0
    moved = 0
    for a, b in _blocks(len(notes)):
        want = first[_rows(split, a, b)]
        moved += int(np.count_nonzero(want != notes[a:b]))
        notes[a:b] = want
    return moved


IN_TRAIN, CLASH = 1, 2  # what is known of a stored row, as bits


def count_copies(splits: dict[str, Split], kept_together: int, *, classes: int,
                 labels_apart: bool, given: bool) -> DatasetCopies:
    """The copies across `splits` (train first; all read rows of one x): samples of val and
    test that read a row some training sample reads, and rows read under two or more of the
    `classes` (0: a regression). `labels_apart`: a label is not part of a file's content (an
    image's class folder), so copies can disagree; `given`: val or test came from the user's
    folders. Without either, each copy is in one split with one label: nothing to count."""
    found, clashes = dict.fromkeys(("val", "test"), 0), 0
    labels_apart = labels_apart and classes > 0
    if labels_apart or given:
        stored = len(splits["train"].x)
        state = np.zeros(stored, np.uint8)
        label = np.full(stored, -1, np.int8 if classes < 127 else np.int32) \
            if labels_apart else None
        for name, split in splits.items():
            for a, b in _blocks(len(split)):
                rows = _rows(split, a, b)
                if name == "train":
                    state[rows] |= IN_TRAIN
                elif name in found:
                    found[name] += int(np.count_nonzero(state[rows] & IN_TRAIN))
                if label is not None:
                    y = np.asarray(split.y[a:b])
                    unset = label[rows] < 0
                    label[rows[unset]] = y[unset]  # one of a block's copies sets it
                    state[rows[label[rows] != y]] |= CLASH
        clashes = int(np.count_nonzero(state & CLASH))
    return DatasetCopies(kept_together=kept_together, val_in_train=found["val"],
                         test_in_train=found["test"], in_two_classes=clashes)
