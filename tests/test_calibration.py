"""Calibrated confidence in the frozen model: temperature scaling at export, the card's
calibration record, conformal prediction sets and intervals in `trainer predict` and
`trainer serve`, each checked against an independent implementation where one exists
(torchmetrics' calibration error, crepes' conformal classifier)."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from scipy.special import softmax as scipy_softmax

from export.card import attach_card, read_card
from export.conformal import Calibration, set_mask, threshold
from export.errors import InputError
from export.runtime import Predictor
from tests.conftest import MNIST, ROOT, assert_one_line_error, run_cli
from trainer.calibration import calibrate, fit_temperature, quality, softmax


def _sampled(n: int, classes: int, true_t: float, seed: int = 0):
    """Logits and labels drawn from softmax(logits / true_t): calibrated at true_t."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (n, classes)).astype(np.float32)
    p = scipy_softmax(logits / true_t, axis=1)
    y = (p.cumsum(1) > rng.random((n, 1))).argmax(1)
    return logits, y


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_the_fitted_temperature_is_the_one_the_labels_were_drawn_at(true_t):
    logits, y = _sampled(40000, 10, true_t)
    assert fit_temperature(logits, y) == pytest.approx(true_t, rel=0.05)
    assert fit_temperature(logits, y) == fit_temperature(logits, y)  # deterministic


def test_ece_agrees_with_torchmetrics():
    import torch
    from torchmetrics.functional.classification import multiclass_calibration_error

    logits, y = _sampled(5000, 7, 2.0, seed=3)
    probs = softmax(logits)  # over-confident for labels drawn at T=2
    ours = quality(probs, y)
    theirs = multiclass_calibration_error(torch.from_numpy(probs), torch.from_numpy(y),
                                          num_classes=7, n_bins=15, norm="l1")
    assert ours.ece == pytest.approx(float(theirs), abs=1e-5)
    assert ours.ece > 0.05 and quality(softmax(logits, 2.0), y).ece < 0.02
    p = probs[np.arange(len(y)), y]
    assert ours.nll == pytest.approx(float(-np.log(p).mean()), rel=1e-6)


def test_prediction_sets_agree_with_crepes():
    """Our threshold and sets against crepes' p-value sets (no smoothing) on the same
    LAC scores, at three coverages."""
    crepes = pytest.importorskip("crepes", reason="crepes is a dev extra: pip install '.[dev]'")
    logits, y = _sampled(3000, 10, 1.0, seed=5)
    probs = softmax(logits)
    cal, test = np.arange(1500), np.arange(1500, 3000)
    scores = 1.0 - probs[cal, y[cal]].astype(np.float64)
    record = Calibration(method="lac", scores=tuple(np.sort(scores)))
    reference = crepes.ConformalClassifier()
    reference.fit(scores)
    for coverage in (0.8, 0.9, 0.95):
        ours = set_mask(probs[test], threshold(record, coverage, "test"))
        theirs = reference.predict_set(1.0 - probs[test].astype(np.float64),
                                       confidence=coverage, smoothing=False)
        assert (ours == theirs.astype(bool)).mean() > 0.999, coverage  # ties at the edge only
        covered = ours[np.arange(len(test)), y[test]].mean()
        assert abs(covered - coverage) < 4 * math.sqrt(coverage * (1 - coverage) / len(test))


def test_calibrate_splits_the_validation_rows_and_keeps_the_argmax():
    from export.runtime import Prediction

    logits, y = _sampled(1000, 5, 3.0, seed=1)
    record = calibrate("classification", Prediction(logits=logits), y, seed=7)
    assert record.fit_rows == 500 and len(record.scores) == 500
    assert record.temperature == pytest.approx(3.0, rel=0.25)
    assert record.fit_after.nll < record.fit_before.nll
    assert list(record.scores) == sorted(record.scores)
    again = calibrate("classification", Prediction(logits=logits), y, seed=7)
    assert again == record
    assert (softmax(logits, record.temperature).argmax(1) == logits.argmax(1)).all()
    off = calibrate("classification", Prediction(logits=logits), y, seed=7, temperature=False)
    assert off.temperature is None and len(off.scores) == 500


def test_a_temperature_at_the_search_bound_is_not_kept():
    """Every fit row right: the NLL falls without limit as T -> 0; T stays 1, with a note."""
    from export.runtime import Prediction

    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 60)
    logits = rng.normal(0, 1, (60, 3)).astype(np.float32)
    logits[np.arange(60), y] += 8.0  # the true class always on top
    record = calibrate("classification", Prediction(logits=logits), y)
    assert record.temperature is None and "kept T=1" in record.note
    assert record.fit_after == record.fit_before


def test_too_high_a_coverage_for_the_rows_and_out_of_range_are_one_line():
    record = Calibration(method="lac", scores=tuple(np.linspace(0, 1, 9)))
    with pytest.raises(InputError, match="at most 0.9000"):
        threshold(record, 0.95, "m")
    for bad in (0, 1, 1.5, -0.1, True):
        with pytest.raises(InputError, match="between 0 and 1"):
            threshold(record, bad, "m")
    with pytest.raises(InputError, match="without conformal scores"):
        threshold(None, 0.9, "m")
    with pytest.raises(InputError, match="calibration.scores"):
        Calibration.from_json({"method": "lac", "scores": [0.3, 0.1]}, "m.onnx", "calibration.")


def test_the_exported_graph_returns_tempered_probabilities(digits_run, digits_test_npz):
    model = digits_run / "model.onnx"
    card = read_card(model)
    cal = card.calibration
    assert cal is not None and cal.method == "lac" and cal.temperature > 0
    split = card.dataset.split_sizes
    assert cal.fit_rows + len(cal.scores) == split["val"]
    assert cal.test_before.rows == cal.test_after.rows == split["test"]
    predictor = Predictor(model, provider="cpu")
    pred = predictor.predict(np.load(digits_test_npz)["x"])
    np.testing.assert_allclose(pred.probabilities, softmax(pred.logits, cal.temperature),
                               atol=1e-6)
    assert (pred.labels == pred.logits.argmax(1)).all()
    assert (digits_run / "calibration.png").stat().st_size > 10_000
    shown = run_cli("inspect", str(model))
    line = next(s for s in shown.stdout.splitlines() if s.startswith("calibration:"))
    assert f"T={cal.temperature:.3g}, test ECE {cal.test_before.ece:.3f} -> " in line


def _predict(model, data, out, *extra):
    return run_cli("predict", "--model", str(model), "--input", str(data), "--output",
                   str(out), "--no-progress", *extra)


def test_predict_writes_prediction_sets_and_their_coverage(digits_run, digits_test_npz,
                                                           tmp_path):
    out = tmp_path / "pred.csv"
    proc = _predict(digits_run / "model.onnx", digits_test_npz, out, "--coverage", "0.9")
    assert proc.returncode == 0, proc.stderr
    import csv

    rows = list(csv.DictReader(out.open()))
    summary = json.loads((tmp_path / "pred.summary.json").read_text())
    sets = [r["prediction_set"].split("|") if r["prediction_set"] else [] for r in rows]
    assert all(len(s) == int(r["set_size"]) for s, r in zip(sets, rows))
    covered = np.mean([r["true_label"] in s for s, r in zip(sets, rows)])
    assert summary["coverage"] == pytest.approx(covered)
    assert summary["mean_set_size"] == pytest.approx(np.mean([len(s) for s in sets]))
    assert all(s[0] == r["label"] for s, r in zip(sets, rows) if s)  # most likely first
    n = len(rows)  # a binomial bound around the guarantee on a few hundred rows
    assert covered >= 0.9 - 4 * math.sqrt(0.09 / n), covered
    assert f"coverage: {summary['coverage']:.4f}" in proc.stdout


def test_coverage_refusals_are_one_line_and_write_nothing(digits_run, digits_test_npz,
                                                         tmp_path):
    model = digits_run / "model.onnx"
    out = tmp_path / "p.csv"
    assert_one_line_error(_predict(model, digits_test_npz, out, "--coverage", "1.5"),
                          "--coverage 1.5", "between 0 and 1")
    assert_one_line_error(_predict(model, digits_test_npz, out, "--coverage", "0.9999"),
                          "--coverage 0.9999", "support a coverage of at most")
    bare = onnx.load(str(model))
    attach_card(bare, read_card(model).replace(calibration=None))
    onnx.save(bare, str(tmp_path / "old.onnx"))
    assert_one_line_error(_predict(tmp_path / "old.onnx", digits_test_npz, out, "--coverage",
                                   "0.9"), "old.onnx", "without conformal scores")
    assert not list(tmp_path.glob("p*")) and not list(tmp_path.glob(".p*"))


def test_export_without_temperature_keeps_the_raw_softmax(digits_run, digits_test_npz,
                                                          tmp_path):
    ckpt = next((digits_run / "checkpoints").glob("best-*.ckpt"))
    proc = run_cli("export", "--ckpt", str(ckpt), "--out", str(tmp_path / "raw.onnx"),
                   "--calibrate", "false")
    assert proc.returncode == 0, proc.stderr
    card = read_card(tmp_path / "raw.onnx")
    assert card.calibration.temperature is None and card.calibration.scores
    assert "temperature scaling off" in proc.stdout
    pred = Predictor(tmp_path / "raw.onnx", provider="cpu").predict(np.load(digits_test_npz)["x"])
    np.testing.assert_allclose(pred.probabilities, softmax(pred.logits), atol=1e-6)


def test_regression_intervals_cover(tmp_path):
    """Diabetes (real, bundled with scikit-learn): conformal intervals from the validation
    residuals cover the held-out test rows at about the asked rate."""
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    cols = [*data.feature_names, "progression"]
    lines = [",".join(cols)] + [",".join(f"{v:.6g}" for v in (*row, t))
                                for row, t in zip(data.data, data.target)]
    (tmp_path / "diabetes.csv").write_text("\n".join(lines) + "\n")
    recipe = ["--config", str(ROOT / "configs" / "tabular.yaml"), "--data.root", "diabetes.csv",
              "--data.target", "progression", "--data.task", "regression",
              "--data.val_fraction", "0.3", "--data.test_fraction", "0.3"]
    proc = run_cli("fit", *recipe, "--trainer.max_epochs", "30",
                   "--trainer.enable_progress_bar", "false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = next((tmp_path / "runs" / "tabular").glob("version_*"))
    card = read_card(run / "model.onnx")
    assert card.calibration.method == "absolute_residual" and card.calibration.temperature is None
    assert len(card.calibration.scores) == card.dataset.split_sizes["val"]
    assert run_cli("data", *recipe, "--split", "test", "--out", str(tmp_path / "test.npz"),
                   cwd=tmp_path).returncode == 0
    out = tmp_path / "pred.csv"
    proc = _predict(run / "model.onnx", tmp_path / "test.npz", out, "--coverage", "0.8")
    assert proc.returncode == 0, proc.stderr
    import csv

    rows = list(csv.DictReader(out.open()))
    inside = [float(r["lower"]) <= float(r["true_value"]) <= float(r["upper"]) for r in rows]
    widths = {round(float(r["upper"]) - float(r["lower"]), 3) for r in rows}
    assert len(widths) == 1  # one residual quantile for every row
    summary = json.loads((tmp_path / "pred.summary.json").read_text())
    assert summary["coverage"] == pytest.approx(np.mean(inside))
    assert summary["mean_interval_width"] == pytest.approx(widths.pop(), abs=1e-3)
    n, m = len(rows), len(card.calibration.scores)  # 132 test rows, 133 calibration rows
    assert abs(summary["coverage"] - 0.8) < 4 * math.sqrt(0.16 * (1 / n + 1 / m)), summary


def _scaled_export(run, tmp_path, scale: float):
    """The run's best checkpoint with its classifier layer multiplied by `scale` (the same
    predictions with sharper or flatter probabilities), exported; its card."""
    import torch

    ckpt = next((run / "checkpoints").glob("best-*.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    classes = len(read_card(run / "model.onnx").class_names)
    weights = state["state_dict"]
    last = [k for k, v in weights.items() if k.endswith("weight") and v.ndim == 2
            and v.shape[0] == classes][-1]
    for key in (last, last[: -len("weight")] + "bias"):
        weights[key] = weights[key] * scale
    torch.save(state, tmp_path / "scaled.ckpt")
    proc = run_cli("export", "--ckpt", str(tmp_path / "scaled.ckpt"), "--out",
                   str(tmp_path / "scaled.onnx"))
    assert proc.returncode == 0, proc.stderr
    return read_card(tmp_path / "scaled.onnx")


def test_a_deliberately_under_confident_model_is_calibrated(digits_run, tmp_path):
    """The digits run's classifier layer x0.25: the same predictions, probabilities far
    flatter than its accuracy. The fitted temperature undoes most of the scale, the test
    split's ECE and NLL fall, and the accuracy is exactly the same. (The over-confident
    case needs a model that makes mistakes: the real-MNIST test below.)"""
    card = _scaled_export(digits_run, tmp_path, 0.25)
    cal = card.calibration
    assert cal.temperature < 0.5, cal.temperature
    assert cal.test_after.ece < cal.test_before.ece / 2
    assert cal.test_after.nll < cal.test_before.nll
    assert card.metrics["test/acc_onnx"] == read_card(digits_run / "model.onnx").metrics[
        "test/acc_onnx"]


@pytest.mark.slow
@pytest.mark.skipif(not MNIST.is_dir(), reason=f"real MNIST not found at {MNIST}")
def test_real_mnist_calibration_and_coverage(tmp_path):
    """The speedrun on real MNIST with heavy label smoothing (under-confident: confidences
    pulled towards 0.7), and the same weights with the classifier layer x4 (over-confident:
    the ~150 test images it gets wrong at confidence ~1): temperature scaling lowers the
    test ECE of both; prediction sets cover the 10,000 test images within a binomial bound
    at three coverages."""
    proc = run_cli("fit", "--config", str(ROOT / "configs" / "mnist_speedrun.yaml"),
                   "--data.root", str(MNIST), "--model.label_smoothing", "0.3",
                   "--data.val_fraction", "0.1", "--trainer.enable_progress_bar", "false",
                   "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), cwd=tmp_path,
                   timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = next((tmp_path / "runs").rglob("model.onnx"))
    cal = read_card(model).calibration
    assert cal.temperature < 1 and cal.test_after.ece < cal.test_before.ece / 2, cal
    sharp = _scaled_export(model.parent, tmp_path, 4.0).calibration
    assert sharp.temperature > 1 and sharp.test_after.ece < sharp.test_before.ece, sharp
    data = tmp_path / "test.npz"
    assert run_cli("data", "--config", str(ROOT / "configs" / "mnist_speedrun.yaml"),
                   "--data.root", str(MNIST), "--split", "test", "--out", str(data),
                   cwd=tmp_path).returncode == 0
    for coverage in (0.8, 0.9, 0.95):
        out = tmp_path / f"pred{coverage}.csv"
        assert _predict(model, data, out, "--coverage", str(coverage)).returncode == 0
        got = json.loads(out.with_name(out.stem + ".summary.json").read_text())["coverage"]
        # calibration rows n (the conformal half of validation) and 10,000 test rows
        sd = math.sqrt(coverage * (1 - coverage) * (1 / len(cal.scores) + 1 / 10000))
        assert abs(got - coverage) < 4 * sd + 1 / (len(cal.scores) + 1), (coverage, got)
