"""FixedDataset: what every source yields, and its content fingerprint."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # (N, C, H, W) uint8 images, or (N, F) float32 features
    y: np.ndarray  # (N,) int64 class indices

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class FixedDataset:
    """A whole dataset decoded once into compact arrays.

    `train` is split further into train/val by the DataModule; `test` is the source's own
    test split when it has one.
    """

    name: str
    train: Split
    test: Split | None
    class_names: list[str]
    # How deployment inputs look: name, dtype, layout, per-sample shape, value range.
    input_spec: dict
    fingerprint: str = field(default="")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def fingerprint(name: str, class_names: list[str], splits: list[Split | None]) -> str:
    """SHA-256 over content only (arrays, dtypes, shapes, class names): stable across
    machines, file names and timestamps."""
    h = hashlib.sha256()
    h.update(name.encode())
    h.update("\x00".join(class_names).encode())
    for split in splits:
        if split is None:
            h.update(b"<none>")
            continue
        for arr in (split.x, split.y):
            arr = np.ascontiguousarray(arr)
            h.update(f"{arr.dtype.str}{arr.shape}".encode())
            h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def make_dataset(name: str, train: Split, test: Split | None, class_names: list[str],
                 input_spec: dict) -> FixedDataset:
    """Build a FixedDataset, checking labels and values, and stamp its fingerprint."""
    from export.errors import InputError

    for split_name, split in (("train", train), ("test", test)):
        if split is None:
            continue
        if len(split) == 0:
            raise InputError(f"{name}: the {split_name} split is empty")
        if len(split.x) != len(split.y):
            raise InputError(f"{name}: {split_name} split has {len(split.x)} samples "
                             f"but {len(split.y)} labels")
        bad = (split.y < 0) | (split.y >= len(class_names))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise InputError(f"{name}: {split_name} label {int(split.y[row])} at row {row} is "
                             f"outside the {len(class_names)} classes")
        if split.x.dtype.kind == "f" and not np.isfinite(split.x).all():
            row = int(np.flatnonzero(~np.isfinite(split.x).reshape(len(split.x), -1).all(1))[0])
            raise InputError(f"{name}: {split_name} row {row} has NaN or infinite features")
    fp = fingerprint(name, class_names, [train, test])
    return FixedDataset(name, train, test, class_names, input_spec, fp)
