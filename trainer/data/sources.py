"""Fixed-dataset sources. Each reads its files once and returns a FixedDataset.

Add a source by writing a `load_<name>(root)` function and listing it in SOURCES.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from export.errors import InputError
from trainer.data.dataset import FixedDataset, Split, make_dataset


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
    }


def load_digits(root: str | None = None) -> FixedDataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 samples, 10 classes).

    Pixels are 0..16 intensities; they are rescaled once to 0..255 so that the model takes
    ordinary 8-bit grayscale images (and a folder of PNGs works at predict time).
    """
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    names = [str(c) for c in bunch.target_names]
    return make_dataset("digits", Split(x, y), None, names, image_spec(1, 8, 8))


IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_idx(root: Path, stem: str) -> Path:
    """Accept `stem`, `stem.gz` and the dotted variant (`train-images.idx3-ubyte`)."""
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (root / name).is_file():
            return root / name
    raise InputError(f"{root}: missing IDX file {stem}[.gz]")


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Read one IDX file (uint8 payload), checking its magic number and length."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise InputError(f"{path}: cannot read IDX file ({exc})") from None
    if len(raw) < 8:
        raise InputError(f"{path}: IDX file is truncated ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise InputError(f"{path}: IDX magic number is {magic}, expected {expected_magic}")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = offset + int(np.prod(dims))
    if len(raw) != expected:
        raise InputError(f"{path}: IDX file has {len(raw)} bytes, expected {expected} "
                         f"for dimensions {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def load_mnist(root: str | None) -> FixedDataset:
    """MNIST-format IDX files (MNIST, Fashion-MNIST, KMNIST): 28x28 grayscale, 10 classes."""
    if not root:
        raise InputError("data.root: the mnist source needs the folder holding the IDX files")
    folder = Path(root)
    if not folder.is_dir():
        raise InputError(f"{folder}: data folder not found")
    splits = {}
    for split, (img_stem, lbl_stem) in IDX_FILES.items():
        x = read_idx(_find_idx(folder, img_stem), 2051)[:, None]  # (N, 1, 28, 28)
        y = read_idx(_find_idx(folder, lbl_stem), 2049).astype(np.int64)
        if len(x) != len(y):
            raise InputError(f"{folder}: {split} has {len(x)} images but {len(y)} labels")
        splits[split] = Split(np.ascontiguousarray(x), y)
    names = [str(i) for i in range(10)]
    return make_dataset("mnist", splits["train"], splits["test"], names,
                        image_spec(1, *splits["train"].x.shape[2:]))


def load_arrays(root: str | None) -> FixedDataset:
    """An .npz with `x` (uint8 images N,C,H,W or N,H,W; or float features N,F) and `y`."""
    if not root:
        raise InputError("data.root: the arrays source needs the path of an .npz file")
    path = Path(root)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    with np.load(path, allow_pickle=False) as npz:
        for key in ("x", "y"):
            if key not in npz:
                raise InputError(f"{path}: missing array '{key}' (found {sorted(npz.files)})")
        x, y = npz["x"], npz["y"]
        names = [str(n) for n in npz["class_names"]] if "class_names" in npz else None
    if y.dtype.kind not in "iu":
        raise InputError(f"{path}: 'y' must hold integer class labels, got dtype {y.dtype}")
    names = names or [str(i) for i in range(int(y.max()) + 1)]
    if x.dtype == np.uint8:
        x = x[:, None] if x.ndim == 3 else x
        if x.ndim != 4:
            raise InputError(f"{path}: uint8 'x' must be (N, C, H, W) or (N, H, W), got {x.shape}")
        spec = image_spec(*x.shape[1:])
    else:
        if x.ndim != 2 or x.dtype.kind not in "fiu":
            raise InputError(f"{path}: 'x' must be uint8 images or numeric (N, F) features, "
                             f"got {x.dtype} {x.shape}")
        x = x.astype(np.float32)
        spec = {"name": "features", "kind": "tabular", "dtype": "float32", "layout": "NF",
                "shape": [x.shape[1]], "value_range": [float(x.min()), float(x.max())]}
    return make_dataset(path.stem, Split(x, y.astype(np.int64)), None, names, spec)


SOURCES = {"digits": load_digits, "mnist": load_mnist, "arrays": load_arrays}


def load_source(source: str, root: str | None) -> FixedDataset:
    if source not in SOURCES:
        raise InputError(f"data.source: unknown source {source!r}; expected one of {sorted(SOURCES)}")
    return SOURCES[source](root)
