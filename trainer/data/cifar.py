"""CIFAR-10 as distributed: python pickle batches `data_batch_1..5`, `test_batch`,
`batches.meta`. Read with a restricted unpickler that builds only numpy arrays and plain
containers, so a tampered batch file cannot run code."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from export.errors import InputError
from trainer.data.dataset import (FixedDataset, SourceOptions, Split, image_spec, make_dataset,
                                  require_root)

TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_batch(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"{path}: missing CIFAR-10 batch file")
    try:
        with open(path, "rb") as f:
            raw = _ArraysOnly(f, encoding="bytes").load()
    except Exception as exc:  # truncated or foreign pickles raise many types
        raise InputError(f"{path}: not a CIFAR-10 batch ({type(exc).__name__}: {exc})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: not a CIFAR-10 batch (expected a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _images(path: Path) -> Split:
    batch = read_batch(path)
    if "data" not in batch or "labels" not in batch:
        raise InputError(f"{path}: CIFAR-10 batch lacks 'data' or 'labels'")
    data = np.asarray(batch["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise InputError(f"{path}: 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    try:
        y = np.asarray(batch["labels"])
    except ValueError:  # lists of several lengths
        y = np.empty(0, object)
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise InputError(f"{path}: 'labels' must be one integer class a row, got {y.dtype} "
                         f"{y.shape}")
    if len(y) != len(data):
        raise InputError(f"{path}: {len(data)} images but {len(y)} labels")
    return Split(data.reshape(-1, 3, 32, 32), y.astype(np.int64))  # rows: R, G, B planes


def load_cifar10(root: str | None, opts: SourceOptions) -> FixedDataset:
    folder = require_root(root, "cifar10", "the folder of CIFAR-10 python batches")
    meta = read_batch(folder / "batches.meta")
    names = meta.get("label_names")
    if not isinstance(names, (list, tuple, np.ndarray)) or np.ndim(names) != 1 or not len(names):
        raise InputError(f"{folder / 'batches.meta'}: no 'label_names' (a list of the class "
                         "names)")
    names = [n.decode(errors="replace") if isinstance(n, bytes) else str(n) for n in names]
    parts = [_images(folder / b) for b in TRAIN_BATCHES]
    train = Split(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))
    test = _images(folder / "test_batch")
    return make_dataset("cifar10", train, test, names, image_spec(3, 32, 32), origin=folder)
