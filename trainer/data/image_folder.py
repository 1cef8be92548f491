"""A folder of images, one sub-folder per class (optionally under train/, val/, test/).

Decoded once by the deployment decoder (export/imaging.py: EXIF orientation, bit depth,
colour mode, antialiased bilinear resize), so training sees exactly the pixels `trainer
predict` will feed the model; then cached on disk keyed by the files' content: the second run reads one .npy
(memory-mapped) instead of decoding again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from export.atomic import atomic_path
from export.errors import InputError
from trainer.data.dataset import (FixedDataset, SourceOptions, Split, image_spec, make_dataset,
                                  require_root)

SUFFIXES = {".png", ".jpg", ".jpeg"}
SPLITS = ("train", "val", "test")
CACHE_VERSION = "2"  # 2: decoded by export/imaging.py


def _class_files(folder: Path) -> dict[str, list[Path]]:
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise InputError(f"{folder}: no class sub-folders found")
    out = {}
    for cls in classes:
        files = sorted(p for p in cls.rglob("*") if p.suffix.lower() in SUFFIXES)
        if not files:
            raise InputError(f"{cls}: class folder has no PNG or JPEG images")
        out[cls.name] = files
    return out


def _layout(root: Path) -> dict[str, dict[str, list[Path]]]:
    """{split: {class: files}}; a root without train/ is one train split."""
    if not (root / "train").is_dir():
        return {"train": _class_files(root)}
    layout = {s: _class_files(root / s) for s in SPLITS if (root / s).is_dir()}
    names = list(layout["train"])
    for split, classes in layout.items():
        if list(classes) != names:
            raise InputError(f"{root / split}: class folders {list(classes)} differ from "
                             f"train's {names}")
    return layout


def _first_image_format(path: Path) -> tuple[str, tuple[int, int]]:
    from export.imaging import probe

    return probe(path.read_bytes(), str(path))


def _decode_all(files: list[Path], spec: dict, x: np.ndarray) -> None:
    """Decode every file into `x` with the deployment decoder, in threads (pillow releases
    the GIL while decoding)."""
    from concurrent.futures import ThreadPoolExecutor

    from export.imaging import decode

    def one(i: int) -> None:
        x[i] = decode(files[i].read_bytes(), spec, str(files[i]))

    with ThreadPoolExecutor() as pool:
        list(pool.map(one, range(len(files))))


def load_image_folder(root: str | None, opts: SourceOptions) -> FixedDataset:
    folder = require_root(root, "image_folder", "a folder with one sub-folder per class")
    layout = _layout(folder)
    names = list(layout["train"])
    files = [(s, names.index(c), p) for s, cl in layout.items() for c, ps in cl.items() for p in ps]
    mode, size = _first_image_format(files[0][2])
    mode = opts.color_mode or mode
    size = tuple(opts.image_size) if opts.image_size else size
    if mode not in ("L", "RGB"):
        raise InputError(f"data.color_mode: expected L or RGB, got {mode!r}")

    key = hashlib.sha256(f"{CACHE_VERSION}|{mode}|{size}|{names}".encode())
    for split, label, path in files:
        key.update(f"{split}|{label}|{path.relative_to(folder)}|".encode())
        key.update(hashlib.sha256(path.read_bytes()).digest())
    cache = Path(opts.cache_dir or os.environ.get("FROZENFIT_CACHE",
                                                  Path.home() / ".cache" / "frozenfit"))
    x_path, meta_path = (cache / f"{key.hexdigest()}.{ext}" for ext in ("x.npy", "meta.json"))
    spec = image_spec(1 if mode == "L" else 3, *size)
    if not (x_path.is_file() and meta_path.is_file()):
        x = np.empty((len(files), *spec["shape"]), dtype=np.uint8)
        _decode_all([path for _, _, path in files], spec, x)
        with atomic_path(x_path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, x)
        meta = {"labels": [lbl for _, lbl, _ in files], "splits": [s for s, _, _ in files]}
        with atomic_path(meta_path) as tmp:
            tmp.write_text(json.dumps(meta))
        print(f"image_folder: {folder}: decoded {len(files)} images to {mode} "
              f"{size[0]}x{size[1]} (cached in {cache})", file=sys.stderr)
    x = np.load(x_path, mmap_mode="r")
    meta = json.loads(meta_path.read_text())
    y, split_of = np.array(meta["labels"], dtype=np.int64), np.array(meta["splits"])
    parts = {s: Split(x, y).subset(np.flatnonzero(split_of == s)) for s in layout}
    return make_dataset(folder.name, parts["train"], parts.get("test"), names,
                        spec, val=parts.get("val"),
                        origin=folder)
