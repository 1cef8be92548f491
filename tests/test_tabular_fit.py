"""Tabular recipes end to end on real bundled data: wine (classification, string labels)
and diabetes (regression), CSV -> fit -> ONNX -> predict."""

from __future__ import annotations

import re

import numpy as np
import pytest
from sklearn.datasets import load_diabetes, load_wine

from export.card import read_card
from tests.conftest import ROOT, run_cli


def _fit_table(tmp_path, frame: str, target, epochs="40"):
    csv = tmp_path / "table.csv"
    csv.write_text(frame)
    proc = run_cli("fit", "--config", str(ROOT / "configs" / "tabular.yaml"),
                   "--data.root", str(csv), "--data.target", target,
                   "--trainer.max_epochs", epochs, "--trainer.enable_progress_bar", "false",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = next((tmp_path / "runs" / "tabular").glob("version_*"))
    data = tmp_path / "test.npz"
    proc = run_cli("data", "--config", str(ROOT / "configs" / "tabular.yaml"),
                   "--data.root", str(csv), "--data.target", target, "--out", str(data),
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli("predict", "--model", str(run / "model.onnx"), "--input", str(data),
                   "--output", str(tmp_path / "preds.csv"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, data, proc.stdout


def _csv_text(x, columns, target_name, target_values):
    lines = [",".join([*columns, target_name])]
    lines += [",".join([*(f"{v:.6g}" for v in row), str(t)]) for row, t in zip(x, target_values)]
    return "\n".join(lines) + "\n"


@pytest.mark.slow  # test_hostile fits the same CSV in the default run; CI runs this
def test_wine_classification_from_csv(tmp_path):
    wine = load_wine()
    names = np.array(["barolo", "grignolino", "barbera"])[wine.target]
    text = _csv_text(wine.data, wine.feature_names, "cultivar", names)
    run, _, out = _fit_table(tmp_path, text, "cultivar")
    card = read_card(run / "model.onnx")
    assert card.task == "classification"
    assert card.class_names == ("barbera", "barolo", "grignolino")
    assert list(card.input.columns) == wine.feature_names
    assert float(re.search(r"accuracy: ([0-9.]+)", out).group(1)) >= 0.9


def test_diabetes_regression_from_csv(tmp_path):
    diabetes = load_diabetes()
    text = _csv_text(diabetes.data, diabetes.feature_names, "progression",
                     [f"{v:.1f}" for v in diabetes.target])
    run, data, out = _fit_table(tmp_path, text, "progression", epochs="60")
    card = read_card(run / "model.onnx")
    assert card.task == "regression" and card.outputs == ("values",)
    assert card.consistency.checked and card.consistency.metric == "val/mae"
    shown = run_cli("inspect", str(run / "model.onnx")).stdout
    assert "task:        regression" in shown and "classes:" not in shown
    y = np.load(data)["y"]
    baseline = np.abs(y - y.mean()).mean()  # predicting the mean: about 64
    mae = float(re.search(r"mae: ([0-9.]+)", out).group(1))
    assert mae < 0.8 * baseline, (mae, baseline)


@pytest.mark.parametrize("target", ["label", "value"])
def test_trainer_data_writes_a_split_a_chunk_at_a_time(tmp_path, monkeypatch, target):
    """`trainer data` writes x and y a chunk at a time (a split's labels are read through
    its notes, never read whole: 800 MB as int64 at 100 million rows); the archive is the same whatever the chunk, and each
    row's y is its own x's (the label is a function of the features)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from trainer.data import dataset, stats
    from trainer.data.lazy import LazyArray
    from trainer.train_commands import cmd_data

    def whole(self, dtype=None, copy=None):
        raise AssertionError(f"{type(self).__name__} of {len(self)} read whole")

    monkeypatch.setattr(LazyArray, "__array__", whole)
    monkeypatch.setattr(stats, "MAX_ROWS", 1000)  # (its sample of the split is read whole)

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=3000).astype("f4"), rng.normal(size=3000).astype("f4")
    targets = {"label": np.where(a > 0, "pos", "neg"), "value": a * 2 + b}
    pq.write_table(pa.table({"a": a, "b": b, target: targets[target]}), tmp_path / "t.parquet")
    flags = ["--config", str(ROOT / "configs" / "tabular.yaml"), "--data.root",
             str(tmp_path / "t.parquet"), "--data.target", target, "--data.cache_dir",
             str(tmp_path / "c"), "--data.memory_budget_gb", "0.000001", "--split", "train"]
    written = []
    for chunk in (1 << 30, 8 * 97):  # one chunk; chunks of 97 rows
        monkeypatch.setattr(dataset, "CHUNK_BYTES", chunk)
        out = tmp_path / f"{chunk}.npz"
        assert cmd_data([*flags, "--out", str(out)]) == 0
        with np.load(out) as z:
            written.append({k: z[k] for k in z.files})
    assert written[0].keys() == written[1].keys() == {"x", "y", "class_names"}
    for k in written[0]:
        np.testing.assert_array_equal(written[0][k], written[1][k])
    x, y = written[1]["x"], written[1]["y"]
    assert len(x) == len(y) > 1500
    if target == "label":
        assert y.dtype == np.int64 and written[1]["class_names"].tolist() == ["neg", "pos"]
        np.testing.assert_array_equal(y, (x[:, 0] > 0).astype(np.int64))
    else:
        np.testing.assert_allclose(y, x[:, 0] * 2 + x[:, 1], rtol=1e-5, atol=1e-5)
