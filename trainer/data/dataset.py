"""FixedDataset: what every source yields, and its content fingerprint."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from export.errors import InputError
from export.imaging import PREPROCESSING


@dataclass(frozen=True)
class Split:
    """Rows of a dataset. `x` may be a read-only np.memmap (a dataset larger than RAM);
    `rows` selects a subset without copying it."""

    x: np.ndarray  # (N, C, H, W) uint8 images, or (N, F) float32 features
    y: np.ndarray  # (N,) int64 class indices, or float32 regression targets
    rows: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.y) if self.rows is None else len(self.rows)

    @property
    def nbytes(self) -> int:
        row = self.x[0].nbytes if len(self.x) else 0
        return len(self) * (row + self.y.itemsize)

    def subset(self, rows: np.ndarray) -> Split:
        base = rows if self.rows is None else self.rows[rows]
        return replace(self, rows=base)

    def arrays(self, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The rows as in-memory arrays (the first `limit` of them)."""
        if self.rows is None:
            return np.asarray(self.x[:limit]), np.asarray(self.y[:limit])
        rows = self.rows[:limit]
        return np.asarray(self.x[rows]), np.asarray(self.y[rows])


@dataclass(frozen=True)
class SourceOptions:
    """Options some sources need; each source reads only its own."""

    image_size: tuple[int, int] | None = None  # image_folder: (H, W); None = first image's
    color_mode: str | None = None  # image_folder: "L" or "RGB"; None = first image's
    target: str = "target"  # tabular: the target column
    task: str = "auto"  # tabular: classification, regression or auto
    cache_dir: str | None = None  # image_folder: decoded-array cache


@dataclass(frozen=True)
class FixedDataset:
    """A whole dataset decoded once into compact arrays.

    `train` is split further into train/val by the DataModule unless the source has its own
    `val`; `test` is the source's own test split when it has one.
    """

    name: str
    train: Split
    val: Split | None
    test: Split | None
    class_names: list[str]  # empty for regression
    # How deployment inputs look: name, kind, dtype, layout, per-sample shape, value range.
    input_spec: dict
    task: str = "classification"
    fingerprint: str = field(default="")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def image_spec(channels: int, height: int, width: int) -> dict:
    """Input spec of a uint8 image model: the graph takes raw 0..255 pixels, NCHW."""
    return {
        "name": "image",
        "kind": "image",
        "dtype": "uint8",
        "layout": "NCHW",
        "shape": [channels, height, width],
        "value_range": [0, 255],
        "color_mode": "L" if channels == 1 else "RGB",
        "resize": [height, width],
        # How files become these pixels (export/imaging.py), for any runtime to reproduce.
        "preprocessing": PREPROCESSING,
    }


def feature_spec(columns: list[str], x: np.ndarray) -> dict:
    """Input spec of a tabular model: float32 features in the training column order."""
    return {
        "name": "features",
        "kind": "tabular",
        "dtype": "float32",
        "layout": "NF",
        "shape": [len(columns)],
        "columns": columns,
        "value_range": [float(x.min()), float(x.max())],
    }


def require_root(root: str | None, source: str, what: str, file: bool = False) -> Path:
    if not root:
        raise InputError(f"data.root: the {source} source needs {what}")
    path = Path(root)
    if file and not path.is_file():
        raise InputError(f"{path}: file not found (data.root)")
    if not file and not path.is_dir():
        raise InputError(f"{path}: folder not found (data.root)")
    return path


def fingerprint(class_names: list[str], splits: list[Split | None]) -> str:
    """SHA-256 over content only (arrays, dtypes, shapes, class names): stable across
    machines, folder and file names, and timestamps. Large arrays are hashed in chunks."""
    h = hashlib.sha256()
    h.update("\x00".join(class_names).encode())
    for split in splits:
        if split is None:
            h.update(b"<none>")
            continue
        parts = (split.x, split.y) if split.rows is None else (split.x, split.y, split.rows)
        for arr in parts:
            h.update(f"{arr.dtype.str}{arr.shape}".encode())
            step = max(1, (64 << 20) // max(1, arr[:1].nbytes))  # ~64 MiB per chunk
            for start in range(0, len(arr), step):
                h.update(memoryview(np.ascontiguousarray(arr[start:start + step])).cast("B"))
    return h.hexdigest()


def _check_split(name: str, split_name: str, split: Split, num_classes: int) -> None:
    if len(split) == 0:
        raise InputError(f"{name}: the {split_name} split is empty")
    if len(split.x) != len(split.y):
        raise InputError(f"{name}: {split_name} split has {len(split.x)} samples "
                         f"but {len(split.y)} labels")
    if num_classes:
        bad = (split.y < 0) | (split.y >= num_classes)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise InputError(f"{name}: {split_name} label {split.y[row]} at row {row} is "
                             f"outside the {num_classes} classes")
    elif not np.isfinite(split.y).all():
        row = int(np.flatnonzero(~np.isfinite(split.y))[0])
        raise InputError(f"{name}: {split_name} target at row {row} is NaN or infinite")
    if split.x.dtype.kind == "f":
        finite = np.isfinite(split.x).reshape(len(split.x), -1)
        if not finite.all():
            row = int(np.flatnonzero(~finite.all(1))[0])
            col = int(np.flatnonzero(~finite[row])[0])
            raise InputError(f"{name}: {split_name} row {row}, feature {col} is NaN or infinite")


def make_dataset(name: str, train: Split, test: Split | None, class_names: list[str],
                 input_spec: dict, val: Split | None = None, task: str = "classification",
                 origin: str | Path | None = None) -> FixedDataset:
    """Build a FixedDataset, checking labels and values, and stamp its fingerprint.
    `origin` (the file or folder read) is what error messages name."""
    for split_name, split in (("train", train), ("val", val), ("test", test)):
        if split is not None:
            _check_split(str(origin or name), split_name, split, len(class_names))
    fp = fingerprint(class_names, [train, val, test])
    return FixedDataset(name, train, val, test, class_names, input_spec, task, fp)
