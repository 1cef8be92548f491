"""What changed in a dataset since the one a parent model learned from.

A source with a per-file cache (image folders, tables) saves, for each dataset fingerprint
it produces, a snapshot beside its cache: every file's path key, content digest and row
count, sorted by key (56 bytes a file on disk, a few MB of memory whatever the number of
files; the newest `KEEP` fingerprints are kept). A fit that
starts from a parent model (`--model.init_from`) compares the snapshot of the parent's
fingerprint with the current one: files added, removed and changed (same path, other
content), and the rows that came in and went out with them. Where no snapshot of the
parent's dataset is at hand (another source, another machine, evicted) the change is
recorded as not known, with the reason, never guessed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from export.atomic import atomic_path
from export.dataset_card import DatasetChange, DatasetInfo
from export.records import is_count
from trainer.data.bucketsort import bucket_sorted
from trainer.data.records import (READ_ROWS, Records, pread_rows, read_npy_header,
                                  write_npy_header)

KEEP = 4
SNAPSHOT = np.dtype([("key", "S16"), ("digest", "S32"), ("rows", "<i8")])


def save_snapshot(cache_folder: Path, fp: str, records: Records) -> Path:
    """Record the files behind fingerprint `fp`; returns the snapshot folder."""
    where = cache_folder / "snapshots"
    path = where / f"{fp}.npy"
    if path.exists():
        os.utime(path)  # the newest again, so eviction keeps it
        return where
    where.mkdir(exist_ok=True)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            write_npy_header(f, SNAPSHOT, len(records))
            for part in _by_key(records, where):
                f.write(part.tobytes())
    except OSError:  # a full disk costs the record of a change, never the run
        return where
    kept = sorted(where.glob("*.npy"), key=lambda p: p.stat().st_mtime_ns)
    for old in kept[:-KEEP]:
        old.unlink(missing_ok=True)
    return where


def _by_key(records: Records, scratch_folder: Path) -> Iterator[np.ndarray]:
    """The records as snapshot rows in key order, a bucket at a time (bucketsort): memory
    holds a block and a bucket, where a sort of every key with a gather of every digest held
    64 bytes a file."""

    def rows(a: int, b: int) -> np.ndarray:
        part = np.empty(b - a, SNAPSHOT)
        for field, column in (("key", "key"), ("digest", "digest"), ("rows", "count")):
            part[field] = records.block(column, a, b)
        return part

    return bucket_sorted(len(records), lambda a, b: records.block("key", a, b), rows,
                         lambda part: part["key"], scratch_folder)


class _Snapshot:
    """A snapshot file, read a block of rows at a time (never whole). Raises OSError or
    ValueError for a file that is not one."""

    def __init__(self, path: Path):
        with open(path, "rb") as f:
            shape, fortran, dtype, self.at = read_npy_header(f)
        if dtype != SNAPSHOT or len(shape) != 1 or fortran or \
                path.stat().st_size != self.at + shape[0] * SNAPSHOT.itemsize:
            raise ValueError(f"{path}: not a snapshot")
        self.path, self.n = path, shape[0]

    def rows(self, a: int, b: int) -> np.ndarray:
        with open(self.path, "rb") as f:
            return pread_rows(f.fileno(), SNAPSHOT, self.at, min(a, self.n), min(b, self.n),
                              f"{self.path}: cut short")


def _open(path: Path) -> _Snapshot | None:
    try:
        return _Snapshot(path)
    except (OSError, ValueError, KeyError, EOFError):
        return None


def _compare(old: _Snapshot, new: _Snapshot) -> dict:
    """Files added, removed, changed and unchanged, and the rows that came and went, from
    two snapshots sorted by key, merged a block of each at a time: each step takes the keys
    of both blocks up to the smaller of their last keys (all of one block at least)."""
    out = dict.fromkeys(("files_added", "files_removed", "files_changed", "files_unchanged",
                         "rows_added", "rows_removed"), 0)
    i = j = 0
    while i < old.n or j < new.n:
        a, b = old.rows(i, i + READ_ROWS), new.rows(j, j + READ_ROWS)
        limit = min(x["key"][-1] for x in (a, b) if len(x))
        a = a[:np.searchsorted(a["key"], limit, side="right")]
        b = b[:np.searchsorted(b["key"], limit, side="right")]
        _, x, y = np.intersect1d(a["key"], b["key"], assume_unique=True, return_indices=True)
        changed = a["digest"][x] != b["digest"][y]
        gone, came = np.ones(len(a), bool), np.ones(len(b), bool)
        gone[x[~changed]], came[y[~changed]] = False, False  # changed files count both ways
        for name, value in (("files_added", len(b) - len(y)),
                            ("files_removed", len(a) - len(x)),
                            ("files_changed", changed.sum()),
                            ("files_unchanged", (~changed).sum()),
                            ("rows_added", b["rows"][came].sum()),
                            ("rows_removed", a["rows"][gone].sum())):
            out[name] += int(value)
        i, j = i + len(a), j + len(b)
    return out


def change_since(parent_fp: str | None, fp: str, history: Path | None, source: str) -> dict:
    """The card's `training.dataset_change`: counts against the parent's dataset, or
    `known: false` and why."""
    out = {"parent_fingerprint": parent_fp or "", "known": False}
    if not parent_fp:
        return {**out, "note": "the parent checkpoint records no dataset fingerprint"}
    if history is None:
        if parent_fp == fp:
            return {**out, "known": True, "rows_added": 0, "rows_removed": 0,
                    "note": "the same dataset fingerprint"}
        return {**out, "note": f"the {source} source keeps no per-file cache to compare with"}
    old, new = _open(history / f"{parent_fp}.npy"), _open(history / f"{fp}.npy")
    if old is None or new is None:
        return {**out, "note": f"no snapshot of the parent's dataset {parent_fp[:12]} in "
                               f"{history} (the newest {KEEP} are kept)"}
    return {**out, "known": True, **_compare(old, new)}


def change_from_parent(parent_ckpt: dict, dataset: DatasetInfo, fixed) -> DatasetChange:
    """`change_since` for a fit that starts from `parent_ckpt`, on the dataset that
    `dataset` describes (`fixed`: its FixedDataset, if known). The parent's record is read
    leniently: an older or foreign checkpoint only makes the change unknown."""
    parent = parent_ckpt.get("hyper_parameters", {}).get("data_info") or {}
    theirs = parent.get("dataset") if isinstance(parent.get("dataset"), dict) else {}
    change = DatasetChange.from_json(change_since(
        theirs.get("fingerprint"), dataset.fingerprint, getattr(fixed, "history", None),
        dataset.source or "this"), "lineage")
    drawn = fixed is not None and (fixed.val is None or fixed.test is None)
    share = _parent_in_eval(theirs, dataset, change) if drawn else None
    if share:
        print(f"data: {dataset.name}: ~{share:.0%} of the val and test rows are likely rows "
              "the parent trained on (drawn anew over changed data): val/acc, the calibration "
              "and the gates are optimistic; for updates keep val/ and test/ folders fixed, "
              "or judge with trainer compare on held-out data", file=sys.stderr)
    return replace(change, parent_in_eval=share)


def _parent_in_eval(theirs: dict, dataset: DatasetInfo, change: DatasetChange) -> float | None:
    """About what share of val and test, drawn anew over this data, the parent trained on:
    its training share of the rows it had, times the share of today's rows it had. A split
    drawn over other rows (one row added, another seed or fractions) is a fresh draw. None
    where the split is the parent's own, or too little is known to tell."""
    sizes, now = theirs.get("split_sizes"), dataset.split_sizes
    if not (isinstance(sizes, dict) and now and all(map(is_count, sizes.values()))
            and sum(sizes.values()) and change.known):
        return None
    if sizes == now and theirs.get("split_seed") == dataset.split_seed and \
            theirs.get("fingerprint") == dataset.fingerprint:
        return None  # the very same split
    total = sum(now.values())
    kept = (total - min(total, change.rows_added or 0)) / total
    return round(sizes.get("train", 0) / sum(sizes.values()) * kept, 3)
