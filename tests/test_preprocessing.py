"""One image decoder for training and serving (export/imaging.py): awkward real files give
byte-identical arrays on both paths, and a model trained on an image folder scores with
`trainer predict` exactly the test accuracy its card records."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from export.errors import InputError
from export.imaging import decode, image_mode_and_size
from export.readers import iter_chunks
from tests.conftest import ROOT, run_cli
from trainer.data.dataset import SourceOptions, image_spec
from trainer.data.sources import load_source


def _gradient(w: int, h: int) -> np.ndarray:
    """A smooth RGB picture: resampling differences show up in every pixel."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // max(1, w - 1), yy * 255 // max(1, h - 1),
                     (xx + yy) * 255 // max(1, w + h - 2)], -1).astype(np.uint8)


def _awkward_files(folder) -> dict[str, str]:
    """One of each kind of file users feed a model; returns {name: what it is}."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(_gradient(13, 7))
    rgb.save(folder / "odd_size.png")
    rgba = Image.fromarray(np.dstack([_gradient(9, 11), np.full((11, 9), 90, np.uint8)]), "RGBA")
    rgba.save(folder / "rgba.png")
    rgb.quantize(16).save(folder / "palette.png")
    rgb.convert("L").resize((17, 5)).save(folder / "grey.png")
    Image.fromarray(np.linspace(0, 65535, 12 * 10).reshape(10, 12).astype(np.uint16)) \
        .save(folder / "sixteen_bit.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: turn 90 degrees clockwise to view
    Image.fromarray(_gradient(20, 10)).save(folder / "exif_rotated.jpg", exif=exif, quality=95)
    Image.fromarray(_gradient(15, 15)).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    Image.fromarray(np.dstack([_gradient(6, 6)[..., 0], np.full((6, 6), 200, np.uint8)]), "LA") \
        .save(folder / "grey_alpha.png")
    return {p.name: p.suffix for p in folder.iterdir()}


@pytest.mark.parametrize("mode,size", [("RGB", (12, 10)), ("L", (8, 8))])
def test_training_and_prediction_decode_awkward_files_identically(tmp_path, mode, size):
    root = tmp_path / "imgs"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            _awkward_files(root / split / cls)
    opts = SourceOptions(image_size=size, color_mode=mode, cache_dir=str(tmp_path / "cache"))
    ds = load_source("image_folder", str(root), opts)
    spec = ds.input_spec
    assert spec.preprocessing["resample"].startswith("bilinear")

    # Training decoded every file once (the same content once: 8 distinct files in 4
    # folders), and reads them in its own order: train/ then test/, class by class.
    assert len(list((tmp_path / "cache").glob("image_folder-*/x.0.bin"))) == 1
    trained = np.concatenate([ds.train.arrays()[0], ds.test.arrays()[0]])
    order = [p for split in ("train", "test") for cls in ("a", "b")
             for p in sorted((root / split / cls).iterdir())]
    assert len(order) == len(trained) == 32
    served = {}
    for chunk in iter_chunks(root, spec, ds.class_names, rows=5):  # what `trainer predict` reads
        served.update(zip(chunk.ids, chunk.x))
    for row, path in zip(trained, order):
        got = served[str(path.relative_to(root))]
        assert got.dtype == np.uint8 and got.tobytes() == row.tobytes(), path


def test_decoder_semantics(tmp_path):
    files = tmp_path / "f"
    _awkward_files(files)
    grey = image_spec(1, 10, 12)
    sixteen = decode((files / "sixteen_bit.png").read_bytes(), grey, "x")
    # Scaled by the bit depth (65535 -> 255), not truncated or read x257.
    stored = np.asarray(Image.open(files / "sixteen_bit.png"), dtype=np.float64)
    assert stored.max() == 65535
    np.testing.assert_array_equal(sixteen[0], np.rint(stored * 255 / 65535).astype(np.uint8))
    # The EXIF orientation turns the 20x10 stored picture upright: 10 wide, 20 high.
    assert image_mode_and_size((files / "exif_rotated.jpg").read_bytes(), "x") == ("RGB", (20, 10))
    assert image_mode_and_size((files / "sixteen_bit.png").read_bytes(), "x") == ("L", (10, 12))
    with pytest.raises(InputError, match=r"bad\.png: cannot decode image"):
        decode(b"\x89PNG\r\n\x1a\n" + b"\0" * 40, grey, "bad.png")


@pytest.mark.parametrize("side", [9000, 20000])  # over our limit; over pillow's own
def test_a_decompression_bomb_is_refused_before_it_is_allocated(tmp_path, side):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (side, side)).save(bomb)  # up to a 400 Mpixel canvas in a few KB
    assert bomb.stat().st_size < 200_000
    with pytest.raises(InputError, match=r"bomb\.png: .*decompression bomb"):
        decode(bomb.read_bytes(), image_spec(1, 8, 8), str(bomb))


def _digit_images(root, rng):
    """Real 8x8 digits written as PNGs of assorted sizes and modes (train/ and test/)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = np.flatnonzero(d.target < 4)  # four classes keep the fit short
    for n, i in enumerate(keep):
        split = "test" if n % 4 == 0 else "train"
        pixels = np.rint(d.images[i] * (255 / 16)).astype(np.uint8)
        img = Image.fromarray(pixels, "L").resize(tuple(rng.integers(9, 24, 2)),
                                                  Image.Resampling.NEAREST)
        img = img.convert(("L", "RGB", "RGBA")[n % 3])
        folder = root / split / f"d{d.target[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{n}.png")


def test_predict_on_the_test_folder_scores_exactly_the_cards_test_accuracy(tmp_path):
    images = tmp_path / "digits"
    _digit_images(images, np.random.default_rng(0))
    proc = run_cli("fit", "--config", str(ROOT / "configs" / "image_folder.yaml"),
                   "--data.root", str(images), "--data.image_size", "[12, 12]",
                   "--data.color_mode", "L", "--data.hflip", "false", "--data.crop_padding", "1",
                   "--data.cache_dir", str(tmp_path / "cache"), "--trainer.max_epochs", "4",
                   "--trainer.enable_progress_bar", "false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = next((tmp_path / "runs" / "image_folder").glob("version_*")) / "model.onnx"
    proc = run_cli("predict", "--model", str(model), "--input", str(images / "test"),
                   "--output", str(tmp_path / "preds.csv"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = float(re.search(r"accuracy: ([0-9.]+)", proc.stdout).group(1))
    card = json.loads(run_cli("inspect", str(model), "--json").stdout)
    assert card["metrics"]["test/acc_onnx"] > 0.8
    assert served == pytest.approx(card["metrics"]["test/acc_onnx"], abs=5e-5)  # 4 decimals
    # `trainer test` of the run's best checkpoint takes the run's data (root, size, colour)
    # without --data.* given again
    proc = run_cli("test", "--config", str(ROOT / "configs" / "image_folder.yaml"),
                   "--ckpt_path", "best", "--trainer.enable_progress_bar", "false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test: the run's data (data.root" in proc.stderr and "data.image_size" in proc.stderr
