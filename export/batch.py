"""The batch inference job: inputs -> predictions CSV (+ accuracy when labels are given).

numpy + onnxruntime + pillow only. Inputs: an .npz with `x` (and optionally `y`), an .npy,
or a folder of PNG/JPEG images (searched recursively; resized and converted as the model
card says; if every image sits in a folder named after a class, that is its label).
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.atomic import atomic_path
from export.errors import InputError
from export.runtime import Predictor

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


@dataclass
class Inputs:
    ids: list[str]
    x: np.ndarray
    y: np.ndarray | None  # class indices, when the input carries labels


def _labels(y: np.ndarray, class_names: list[str], source: str) -> np.ndarray:
    """Labels may be class indices or class names; return indices. Without classes
    (regression) they are target values."""
    if not class_names:
        return y.astype(np.float32)
    if y.dtype.kind in "iu":
        bad = (y < 0) | (y >= len(class_names))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise InputError(f"{source}: label {int(y[row])} at row {row} is outside the "
                             f"{len(class_names)} classes")
        return y.astype(np.int64)
    index = {name: i for i, name in enumerate(class_names)}
    unknown = [str(v) for v in y if str(v) not in index]
    if unknown:
        raise InputError(f"{source}: label {unknown[0]!r} is not one of the classes {class_names}")
    return np.array([index[str(v)] for v in y], dtype=np.int64)


def read_arrays(path: Path, class_names: list[str]) -> Inputs:
    try:
        if path.suffix == ".npy":
            x, y = np.load(path, allow_pickle=False), None
        else:
            with np.load(path, allow_pickle=False) as npz:
                if "x" not in npz:
                    raise InputError(f"{path}: missing array 'x' (found {sorted(npz.files)})")
                x, y = npz["x"], (npz["y"] if "y" in npz else None)
    except InputError:
        raise
    except Exception as exc:  # zipfile/pickle/format errors
        raise InputError(f"{path}: cannot read arrays ({type(exc).__name__}: {exc})") from None
    if y is not None and len(y) != len(x):
        raise InputError(f"{path}: 'x' has {len(x)} rows but 'y' has {len(y)}")
    labels = None if y is None else _labels(y, class_names, f"{path}:y")
    return Inputs([str(i) for i in range(len(x))], x, labels)


def read_image_folder(folder: Path, spec: dict, class_names: list[str]) -> Inputs:
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{folder}: no PNG or JPEG images found")
    channels, height, width = spec["shape"]
    mode = spec.get("color_mode", "L" if channels == 1 else "RGB")
    x = np.empty((len(files), channels, height, width), dtype=np.uint8)
    for i, path in enumerate(files):
        try:
            with Image.open(path) as img:
                img = img.convert(mode)
                if img.size != (width, height):
                    img = img.resize((width, height), Image.Resampling.BILINEAR)
                arr = np.asarray(img, dtype=np.uint8)
        except (OSError, UnidentifiedImageError) as exc:
            raise InputError(f"{path}: cannot decode image ({exc})") from None
        x[i] = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    parents = [p.parent.name for p in files]
    labels = None
    if all(name in class_names for name in parents):
        labels = np.array([class_names.index(name) for name in parents], dtype=np.int64)
    return Inputs([str(p.relative_to(folder)) for p in files], x, labels)


def read_inputs(path: str | Path, spec: dict, class_names: list[str]) -> Inputs:
    path = Path(path)
    if path.is_dir():
        return read_image_folder(path, spec, class_names)
    if not path.is_file():
        raise InputError(f"{path}: input not found")
    if path.suffix in (".npz", ".npy"):
        return read_arrays(path, class_names)
    raise InputError(f"{path}: unsupported input; expected .npz, .npy or a folder of images")


def _columns(pred, y: np.ndarray | None, class_names: list[str]) -> dict[str, list]:
    """Output columns after `id`: label + confidence (+ true_label), or value (+ true_value)."""
    if pred.values is not None:
        cols = {"value": [f"{v:.6g}" for v in pred.values]}
        if y is not None:
            cols["true_value"] = [f"{v:.6g}" for v in y]
        return cols
    cols = {"label": [class_names[i] for i in pred.labels],
            "confidence": [f"{c:.6f}" for c in pred.confidence]}
    if y is not None:
        cols["true_label"] = [class_names[i] for i in y]
    return cols


def write_csv(path: Path, ids: list[str], columns: dict[str, list]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", *columns])
        writer.writerows(zip(ids, *columns.values()))


def label_metrics(pred, y: np.ndarray) -> dict[str, float]:
    if pred.values is not None:
        err = pred.values - y
        return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err ** 2).mean()))}
    return {"accuracy": float((pred.labels == y).mean())}


def run_batch(model: str | Path, input_path: str | Path, output: str | Path,
              batch_size: int = 1024, provider: str = "auto") -> dict:
    """Predict every input and write one CSV row each; return a summary."""
    output = Path(output)
    if output.suffix != ".csv":
        raise InputError(f"{output}: output must be a .csv file")
    start = time.perf_counter()
    predictor = Predictor(model, provider=provider)
    inputs = read_inputs(input_path, predictor.spec, predictor.class_names)
    pred = predictor.predict(inputs.x, batch_size=batch_size, source=str(input_path))
    write_csv(output, inputs.ids, _columns(pred, inputs.y, predictor.class_names))
    elapsed = time.perf_counter() - start
    summary = {"rows": len(inputs.ids), "output": str(output), "provider": predictor.provider,
               "seconds": round(elapsed, 3), "rows_per_second": round(len(inputs.ids) / elapsed, 1)}
    if inputs.y is not None:
        summary.update(label_metrics(pred, inputs.y))
    return summary
