"""Tables through the batch job: pass-through columns, bad columns and values, and a
million-row CSV streamed in chunks with bounded memory."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from export.to_onnx import export_checkpoint, held_out
from tests.conftest import assert_one_line_error, run_cli
from trainer.data.datamodule import FixedDataModule
from trainer.module import ClassifierModule


def _table(n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    label = np.where(x[:, 0] + 0.5 * x[:, 1] > 0, "up", "down")
    return pa.table({"key": [f"k{i}" for i in range(n)], "a": x[:, 0], "b": x[:, 1],
                     "c": x[:, 2], "label": label})


def _table_model(work):
    """A small MLP classifier fit on a 3-feature table, exported to work/m.onnx."""
    train = _table(2000, 0).drop(["key"])
    pacsv.write_csv(train, work / "train.csv")
    dm = FixedDataModule(source="tabular", root=str(work / "train.csv"), target="label")
    model = ClassifierModule(arch="mlp", width=16, lr=0.01, data_info=dm.info)
    trainer = L.Trainer(max_epochs=5, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)
    trainer.fit(model, dm)
    trainer.save_checkpoint(work / "m.ckpt")
    export_checkpoint(work / "m.ckpt", work / "m.onnx", data=held_out(dm))
    return work / "m.onnx"


@pytest.fixture(scope="module")
def table_model(tmp_path_factory):
    return _table_model(tmp_path_factory.mktemp("table"))


def test_million_row_csv_streams_with_bounded_memory(table_model, tmp_path):
    pacsv.write_csv(_table(1_000_000, 1), tmp_path / "big.csv")
    out = tmp_path / "p.csv"
    proc = run_cli("predict", "--model", str(table_model), "--input", str(tmp_path / "big.csv"),
                   "--output", str(out), "--chunk-rows", "100000", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "p.summary.json").read_text())
    assert summary["rows"] == 1_000_000 and summary["accuracy"] > 0.95
    assert summary["peak_memory_mb"] < 450, summary["peak_memory_mb"]  # ~290 MB measured
    with open(out) as f:
        header = f.readline().strip().split(",")
        count = sum(1 for _ in f)
    assert header == ["id", "key", "label", "confidence", "true_label"] and count == 1_000_000


@pytest.mark.parametrize("frame,needle", [
    (lambda t: t.rename_columns(["key", "A", "b", "c", "label"]), "missing feature column 'a'"),
    (lambda t: t.set_column(2, "b", pa.array([1.0, float("nan")] * 5)), "row 1, column 'b'"),
    (lambda t: t.set_column(3, "c", pa.array(["x"] * 10)), "feature column 'c' is string"),
])
def test_bad_tables(table_model, tmp_path, frame, needle):
    pacsv.write_csv(frame(_table(10, 2)), tmp_path / "in.csv")
    out = tmp_path / "p.csv"
    proc = run_cli("predict", "--model", str(table_model), "--input", str(tmp_path / "in.csv"),
                   "--output", str(out))
    assert_one_line_error(proc, "in.csv", needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]
