"""What changed in a dataset since the one a parent model learned from.

A source with a per-file cache (image folders, tables) saves, for each dataset fingerprint
it produces, a snapshot beside its cache: every file's path key, content digest and row
count, sorted by key (56 bytes a file; the newest `KEEP` fingerprints are kept). A fit that
starts from a parent model (`--model.init_from`) compares the snapshot of the parent's
fingerprint with the current one: files added, removed and changed (same path, other
content), and the rows that came in and went out with them. Where no snapshot of the
parent's dataset is at hand (another source, another machine, evicted) the change is
recorded as not known, with the reason, never guessed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from export.atomic import atomic_path
from export.card import DatasetChange, DatasetInfo
from trainer.data.records import WRITE_ROWS, Records, write_npy_header

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
    order = np.argsort(records.key)  # 4x faster than sorting the records by a field
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            write_npy_header(f, SNAPSHOT, len(order))
            for a in range(0, len(order), WRITE_ROWS):  # in blocks: no whole snapshot
                rows = order[a:a + WRITE_ROWS]
                part = np.empty(len(rows), SNAPSHOT)
                part["key"], part["digest"], part["rows"] = (
                    records.key[rows], records.digest[rows], records.count[rows])
                f.write(part.tobytes())
    except OSError:  # a full disk costs the record of a change, never the run
        return where
    kept = sorted(where.glob("*.npy"), key=lambda p: p.stat().st_mtime_ns)
    for old in kept[:-KEEP]:
        old.unlink(missing_ok=True)
    return where


def _load(path: Path) -> np.ndarray | None:
    try:
        snap = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return snap if snap.dtype == SNAPSHOT and snap.ndim == 1 else None


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
    old, new = _load(history / f"{parent_fp}.npy"), _load(history / f"{fp}.npy")
    if old is None or new is None:
        return {**out, "note": f"no snapshot of the parent's dataset {parent_fp[:12]} in "
                               f"{history} (the newest {KEEP} are kept)"}
    _, i, j = np.intersect1d(old["key"], new["key"], assume_unique=True, return_indices=True)
    changed = old["digest"][i] != new["digest"][j]
    gone, came = np.ones(len(old), bool), np.ones(len(new), bool)
    gone[i[~changed]], came[j[~changed]] = False, False  # changed files count both ways
    return {**out, "known": True, "files_added": len(new) - len(j),
            "files_removed": len(old) - len(i), "files_changed": int(changed.sum()),
            "files_unchanged": int((~changed).sum()),
            "rows_added": int(new["rows"][came].sum()),
            "rows_removed": int(old["rows"][gone].sum())}


def change_from_parent(parent_ckpt: dict, dataset: DatasetInfo, fixed) -> DatasetChange:
    """`change_since` for a fit that starts from `parent_ckpt`, on the dataset that
    `dataset` describes (`fixed`: its FixedDataset, if known). The parent's record is read
    leniently: an older or foreign checkpoint only makes the change unknown."""
    parent = parent_ckpt.get("hyper_parameters", {}).get("data_info") or {}
    change = change_since(parent.get("dataset", {}).get("fingerprint"), dataset.fingerprint,
                          getattr(fixed, "history", None), dataset.source or "this")
    return DatasetChange.from_json(change, "lineage")
