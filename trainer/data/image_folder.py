"""A folder of images, one sub-folder per class (optionally under train/, val/, test/).

Decoded once by the deployment decoder (export/imaging.py: EXIF orientation, bit depth,
colour mode, antialiased bilinear resize), so training sees exactly the pixels `trainer
predict` will feed the model, into the row cache (trainer/data/cache.py): one uint8 row per
file, memory-mapped, kept per file and keyed by content, so a later run decodes only files
that are new or changed and memory never holds the whole folder.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from export.errors import InputError
from export.listing import RUN, SortedNames
from export.names import check_class_names
from trainer.data.cache import RowCache, cache_root
from trainer.data.dataset import (FixedDataset, SourceOptions, Split, file_rows,
                                  files_fingerprint, image_spec, label_dtype, make_dataset,
                                  require_root)
from trainer.data.ingest import update
from trainer.data.lineage import save_snapshot
from trainer.data.paths import PathList, encode_path
from trainer.data.scan import fork_pool, in_order, worth_forking

SUFFIXES = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "val", "test")
CACHE_VERSION = "3"  # 2: decoded by export/imaging.py; 3: the per-file row cache


def _folder_id(path: str | Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _images_under(folder: str, cut: int, above: frozenset, spill: Path | None = None,
                  bail: bool = False) -> SortedNames | None:
    """The image files under `folder` (recursively), their paths less their first `cut`
    characters, in the order of the paths' strings: scandir (several times faster than
    pathlib on large folders), the names packed and sorted as bytes (export/listing.py: a
    folder of millions of images holds no str per file, and past RUN names is sorted in
    runs in `spill`). With `bail` (a forked lister), None past RUN names: such a folder is
    listed again where its runs can be read. A link back to a folder above (`above`: the
    root's and split's, then each walked one's) is not followed again, as the batch job's
    walk (export/readers.py) does not: a loop was walked until the OS refused the path."""
    found, cut = SortedNames(spill), len(encode_path(folder[:cut]))  # bytes from here on
    todo = [(os.fsencode(folder), above | {_folder_id(folder)})]
    suffixes = tuple(encode_path(s) for s in SUFFIXES)
    while todo:
        where, seen = todo.pop()
        names, prefix = [], where[cut:] + b"/"
        with os.scandir(where) as it:
            for entry in it:
                if entry.is_dir():
                    st = entry.stat()  # of the folder a link names
                    if (st.st_dev, st.st_ino) not in seen:
                        todo.append((entry.path, seen | {(st.st_dev, st.st_ino)}))
                elif entry.name.lower().endswith(suffixes):
                    names.append(entry.name)
                    if len(names) == 4096:  # packed a few thousand at a time: no object a file
                        if bail and len(found) + len(names) >= RUN:
                            return None
                        found.add(prefix, names)
                        names = []
        found.add(prefix, names)
    return None if bail and found.runs else found


def _class_names(classes: list[Path], cut: int, above: frozenset,
                 spill: Path | None) -> Iterator[SortedNames]:
    """Each class folder's images (`_images_under`), in order: the first class listed here;
    the others, when as many as it held each are enough (scan.worth_forking), in forked
    processes, one per usable core (listing 1,010,000 images in 10 class folders: 1.2 s in
    one process); a class a forked lister found too large is listed here again."""
    first = _images_under(str(classes[0]), cut, above, spill)
    yield first
    rest = [(str(c), cut, above, spill) for c in classes[1:]]
    workers = worth_forking(len(first) * len(rest), len(rest))
    if not workers:
        yield from (_images_under(*r) for r in rest)
        return
    pool = fork_pool(workers)
    try:
        lister = functools.partial(_images_under, bail=True)
        for r, names in zip(rest, in_order(pool, lister, rest, workers + 1, classes[0].parent)):
            yield _images_under(*r) if names is None else names
    finally:
        pool.shutdown(cancel_futures=True)


def _class_files(folder: Path, listing: PathList, above: frozenset,
                 spill: Path | None) -> dict[str, int]:
    """Add the images of each class folder under `folder` to `listing`; {class: count}.
    Only a few classes' names are held packed beside the listing at a time."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise InputError(f"{folder}: no class sub-folders found")
    check_class_names([c.name for c in classes], folder)  # before any image is read
    out = {}
    for cls, names in zip(classes, _class_names(classes, len(listing.prefix), above, spill)):
        if not len(names):
            raise InputError(f"{cls}: class folder has no PNG or JPEG images")
        out[cls.name] = len(names)
        for block in names.blocks():
            listing.extend_packed(block)
        names.close()
    return out


def _layout(root: Path, spill: Path | None = None) -> tuple[PathList, dict[str, dict[str, int]]]:
    """The images in order and {split: {class: count}}; a root without train/ is one train
    split. With `spill`, the listing lies in files there (memory holds at most RUN names
    of a class while they are sorted, not every name), and so do a huge class's sorted runs."""
    listing, above = PathList(str(root), spill), frozenset({_folder_id(root)})
    if not (root / "train").is_dir():
        return listing, {"train": _class_files(root, listing, above, spill)}
    layout = {s: _class_files(root / s, listing, above | {_folder_id(root / s)}, spill)
              for s in SPLITS if (root / s).is_dir()}
    names = list(layout["train"])
    for split, classes in layout.items():
        if list(classes) != names:
            raise InputError(f"{root / split}: class folders {list(classes)} differ from "
                             f"train's {names}")
    return listing, layout


def _first_image_format(path: str) -> tuple[str, tuple[int, int]]:
    from export.imaging import image_mode_and_size

    return image_mode_and_size(Path(path).read_bytes(), path)


def load_image_folder(root: str | None, opts: SourceOptions) -> FixedDataset:
    from export.imaging import decode

    folder = require_root(root, "image_folder", "a folder with one sub-folder per class")
    paths, layout = _layout(folder, spill=cache_root(opts.cache_dir))
    names = list(layout["train"])
    mode, size = _first_image_format(paths[0])
    mode = opts.color_mode or mode
    size = tuple(opts.image_size) if opts.image_size else size
    if mode not in ("L", "RGB"):
        raise InputError(f"data.color_mode: expected L or RGB, got {mode!r}")
    spec = image_spec(1 if mode == "L" else 3, *size)
    settings = {"decoder": CACHE_VERSION, "mode": mode, "size": list(size)}
    key = hashlib.sha256(f"{os.path.realpath(folder)}|{json.dumps(settings)}".encode())
    where = cache_root(opts.cache_dir) / f"image_folder-{key.hexdigest()[:20]}"

    def decode_file(data: bytes, path: str) -> dict[str, np.ndarray]:
        return {"x": decode(data, spec, path)[None]}

    with RowCache.open(where, {"x": (list(spec.shape), "u1")}, settings) as cache:
        records, report = update(cache, folder, paths, decode_file, opts.verify_cache)
        x = cache.arrays()["x"]
        rows = file_rows(records, cache.rows)  # None when in order (a first ingest)
    del paths
    # labels and splits made after the ingest: 9 bytes a file less at its peak
    sizes = [n for classes in layout.values() for n in classes.values()]
    y = np.repeat(np.tile(np.arange(len(names), dtype=label_dtype(len(names))), len(layout)), sizes)
    split_of = np.repeat(np.arange(len(layout), dtype=np.int8),
                         [sum(c.values()) for c in layout.values()])
    print(f"image_folder: {folder}: {report.line('images')} ({mode} {size[0]}x{size[1]}, "
          f"cache {where})", file=sys.stderr)
    whole = Split(x, y, rows)
    parts = {s: whole.pick(split_of, k) if len(layout) > 1 else whole  # no rows of their own
             for k, s in enumerate(layout)}
    fp = files_fingerprint(json.dumps(settings), names, list(layout), split_of, y, records,
                           where)
    return make_dataset(folder.name, parts["train"], parts.get("test"), names,
                        spec, val=parts.get("val"), origin=folder, fp=fp,
                        history=save_snapshot(where, fp, records))
