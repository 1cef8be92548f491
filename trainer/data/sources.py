"""Fixed-dataset sources. Each reads its files once and returns a FixedDataset.

A source is a function `(root, options) -> FixedDataset` listed in SOURCES.
"""

from __future__ import annotations

import numpy as np

from export.errors import InputError
from export.readers import read_npz
from trainer.data.cifar import load_cifar10
from trainer.data.dataset import (FixedDataset, SourceOptions, Split, feature_spec, image_spec,
                                  make_dataset, require_root, value_range)
from trainer.data.idx import load_mnist
from trainer.data.image_folder import load_image_folder
from trainer.data.tabular import load_tabular


def load_digits(root: str | None, opts: SourceOptions) -> FixedDataset:
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


def load_arrays(root: str | None, opts: SourceOptions) -> FixedDataset:
    """An .npz with `x` (uint8 images N,C,H,W or N,H,W; or numeric features N,F), `y`
    (integer class labels) and optionally `class_names`."""
    path = require_root(root, "arrays", "the path of an .npz file", file=True)
    arrays = read_npz(path, ("x", "y", "class_names"))
    if "y" not in arrays:
        raise InputError(f"{path}: missing array 'y' (the class labels)")
    x, y, names = arrays["x"], arrays["y"], arrays.get("class_names")
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise InputError(f"{path}: 'y' must hold one integer class label a row (N,), got "
                         f"{y.dtype} {y.shape}")
    if x.ndim == 0 or len(x) != len(y):
        raise InputError(f"{path}: 'x' has {len(x) if x.ndim else 'no'} rows but 'y' has "
                         f"{len(y)}; expected one label a row")
    if names is not None and names.ndim != 1:
        raise InputError(f"{path}: 'class_names' must be a list of names (K,), got {names.shape}")
    names = [str(n) for n in names] if names is not None else \
        [str(i) for i in range(int(y.max()) + 1 if len(y) else 0)]
    if 0 in x.shape[1:]:
        raise InputError(f"{path}: 'x' has no values a row ({x.shape})")
    if x.dtype == np.uint8 and x.ndim in (3, 4):
        x = x[:, None] if x.ndim == 3 else x
        if x.shape[1] not in (1, 3):  # an image model takes grey or RGB
            hint = "; an (N, H, W, C) array is x.transpose(0, 3, 1, 2)" \
                if x.shape[3] in (1, 3) else ""
            raise InputError(f"{path}: 'x' images have {x.shape[1]} channels (shape {x.shape}); "
                             f"expected 1 or 3, as (N, C, H, W){hint}")
        spec = image_spec(*x.shape[1:])
    elif x.ndim == 2 and x.dtype.kind in "fiu":
        x = x.astype(np.float32)
        spec = feature_spec([f"f{i}" for i in range(x.shape[1])], value_range(Split(x, y)))
    else:
        raise InputError(f"{path}: 'x' must be uint8 images (N, C, H, W) or (N, H, W), or "
                         f"numeric features (N, F); got {x.dtype} {x.shape}")
    return make_dataset(path.stem, Split(x, y.astype(np.int64)), None, names, spec, origin=path)


SOURCES = {"digits": load_digits, "mnist": load_mnist, "cifar10": load_cifar10,
           "image_folder": load_image_folder, "tabular": load_tabular, "arrays": load_arrays}

# Sources that read whatever their root folder holds (every image, every table file under
# it): anything written inside that folder (a run's plots, its metrics.csv) is data the
# next time.
LISTS_ROOT = frozenset({"image_folder", "tabular"})


def load_source(source: str, root: str | None, opts: SourceOptions | None = None) -> FixedDataset:
    if source not in SOURCES:
        raise InputError(f"data.source: unknown source {source!r}; expected one of "
                         f"{', '.join(SOURCES)}")
    return SOURCES[source](root, opts or SourceOptions())
