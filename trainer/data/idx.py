"""MNIST-format IDX files: MNIST, Fashion-MNIST and KMNIST share the format."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.errors import InputError
from export.readers import read_idx
from trainer.data.dataset import (FixedDataset, SourceOptions, Split, image_spec, make_dataset,
                                  require_root)

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049


def find_idx(root: Path, stem: str) -> Path:
    """Accept `stem`, `stem.gz` and the dotted variant (`train-images.idx3-ubyte`)."""
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (root / name).is_file():
            return root / name
    raise InputError(f"{root}: missing IDX file {stem}[.gz] (or {dotted}[.gz])")


def load_mnist(root: str | None, opts: SourceOptions) -> FixedDataset:
    """The four IDX files in `root`: 28x28 grayscale images, 10 classes."""
    folder = require_root(root, "mnist", "the folder holding the four IDX files")
    splits = {}
    for split, (img_stem, lbl_stem) in IDX_FILES.items():
        x = read_idx(find_idx(folder, img_stem), IMAGES_MAGIC)
        y = read_idx(find_idx(folder, lbl_stem), LABELS_MAGIC).astype(np.int64)
        if len(x) != len(y):
            raise InputError(f"{folder}: {split} has {len(x)} images but {len(y)} labels")
        first = splits["train"].x.shape[2:] if splits else None
        if 0 in x.shape[1:] or first is not None and x.shape[1:] != first:
            raise InputError(f"{folder}: {split} images are {x.shape[1]}x{x.shape[2]}; expected "
                             + (f"those of train, {first[0]}x{first[1]}" if first else
                                "at least 1x1"))
        splits[split] = Split(np.ascontiguousarray(x[:, None]), y)  # (N, 1, 28, 28)
    names = [str(i) for i in range(10)]
    return make_dataset(folder.name or "mnist", splits["train"], splits["test"], names,
                        image_spec(1, *splits["train"].x.shape[2:]), origin=folder)
