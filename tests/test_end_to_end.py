"""The whole path on digits through the CLI: fit -> export -> predict, accuracy asserted."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import onnx
import pytest

from export.card import read_card
from tests.conftest import run_cli


def test_fit_writes_a_complete_run_folder(digits_run):
    assert (digits_run / "config.yaml").is_file()
    assert (digits_run / "metrics.csv").is_file()
    summary = json.loads((digits_run / "metrics.json").read_text())
    assert summary["epochs"] == 6 and len(summary["seconds_per_epoch"]) == 6
    assert summary["best"]["monitor"] == "val/loss" and summary["best"]["val/acc"] > 0.9
    assert summary["test"]["test/acc"] > 0.9 and summary["samples_per_second"] > 0
    for png in ("curves.png", "confusion_matrix.png"):
        assert (digits_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (digits_run / "checkpoints" / "last.ckpt").is_file()
    assert len(list((digits_run / "checkpoints").glob("best-*.ckpt"))) == 1
    model = digits_run / "model.onnx"
    onnx.checker.check_model(onnx.load(str(model)), full_check=True)
    card = read_card(model)
    assert list(card.class_names) == [str(i) for i in range(10)]
    assert card.input.shape == (1, 8, 8) and card.input.dtype == "uint8"
    assert card.dataset.split_sizes == {"train": 1259, "val": 269, "test": 269}
    assert card.parity.max_abs_diff <= 1e-3
    assert card.metrics["val/acc"] > 0.9
    assert card.metrics["test/acc_onnx"] >= 0.95  # the frozen graph on all 269 test rows
    # The graph scores exactly what the run recorded for the same (best) weights.
    assert card.metrics["test/acc_onnx"] == pytest.approx(summary["test"]["test/acc"], abs=1e-6)
    assert card.consistency.checked


def test_fit_says_where_its_seconds_went(digits_run):
    """One `time:` line at the end of the fit, and the same phases in metrics.json: each
    measured, none negative, and together no more than the whole process."""
    phases = json.loads((digits_run / "metrics.json").read_text())["phases"]
    assert list(phases) == ["start", "data", "check", "epochs", "export", "test", "total"]
    assert all(v >= 0 for v in phases.values()), phases
    assert phases["epochs"] > 0 and phases["export"] > 0 and phases["start"] > 0.5
    assert sum(v for k, v in phases.items() if k != "total") <= phases["total"] + 1e-3
    err = (digits_run.parents[2] / "fit.stderr").read_text()
    line = next(s for s in err.splitlines() if s.startswith("time: "))
    assert line == "time: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())


def test_export_then_predict_through_the_cli(digits_run, digits_test_npz, tmp_path):
    best = next((digits_run / "checkpoints").glob("best-*.ckpt"))
    model = tmp_path / "model.onnx"
    proc = run_cli("export", "--ckpt", str(best), "--out", str(model))
    assert proc.returncode == 0, proc.stderr
    assert "parity" in proc.stdout

    preds = tmp_path / "preds.csv"
    proc = run_cli("predict", "--model", str(model), "--input", str(digits_test_npz),
                   "--output", str(preds))
    assert proc.returncode == 0, proc.stderr
    reported = float(re.search(r"accuracy: ([0-9.]+)", proc.stdout).group(1))
    assert reported >= 0.95

    with open(preds) as f:
        rows = list(csv.DictReader(f))
    y = np.load(digits_test_npz)["y"]
    assert len(rows) == len(y) == 269
    assert [r["id"] for r in rows] == [str(i) for i in range(269)]
    labels = np.array([int(r["label"]) for r in rows])
    assert abs((labels == y).mean() - reported) < 1e-4
    conf = np.array([float(r["confidence"]) for r in rows])
    assert ((conf > 0) & (conf <= 1)).all()


def test_graph_takes_raw_pixels_and_has_a_dynamic_batch(digits_run, digits_test_npz):
    import onnxruntime as ort

    session = ort.InferenceSession(str(digits_run / "model.onnx"))
    inp = session.get_inputs()[0]
    assert inp.type == "tensor(uint8)"
    assert not isinstance(inp.shape[0], int)  # symbolic batch dimension
    x = np.load(digits_test_npz)["x"]
    for n in (1, 5, 269):
        logits, probs = session.run(["logits", "probabilities"], {inp.name: x[:n]})
        assert logits.shape == probs.shape == (n, 10)
        np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)


def test_inspect_prints_the_card(digits_run):
    proc = run_cli("inspect", str(digits_run / "model.onnx"))
    assert proc.returncode == 0, proc.stderr
    assert "classes:     10" in proc.stdout and "fingerprint" in proc.stdout
    assert "values in [0, 255]" in proc.stdout and re.search(r"val/samples=269(,|$)", proc.stdout, re.M)
    # 269 validation rows are too few to judge a batch of that size: said at export and here
    assert "drift ref:   269 validation rows: too few" in proc.stdout
    fit_log = (digits_run.parents[2] / "fit.stderr").read_text()
    assert "export: drift reference of 269 validation rows: too few" in fit_log
    proc = run_cli("inspect", str(digits_run / "model.onnx"), "--json")
    assert '"card_version": 2' in proc.stdout
    # the card keeps what the note needs: reading it imports no scipy.stats (1.5 s here)
    import subprocess
    import sys

    code = ("import sys; from trainer.cli import main; main(['inspect', sys.argv[1]]); "
            "assert 'scipy.stats' not in sys.modules, 'scipy.stats imported'")
    quiet = subprocess.run([sys.executable, "-c", code, str(digits_run / "model.onnx")],
                           capture_output=True, text=True, cwd=digits_run)
    assert quiet.returncode == 0 and "drift ref:" in quiet.stdout, quiet.stderr
