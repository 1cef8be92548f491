"""The retraining life cycle through the real `trainer` command: the weights that are
validated, tested, checkpointed and exported are the same ones (EMA included); an export
never contradicts its own numbers; `last` / `best` resolve to a run or are refused; a run
is extended where its schedule allows; one folder per run."""

from __future__ import annotations

import json
import re

import pytest
import torch

from export.card import read_card
from tests.conftest import ROOT, assert_one_line_error, run_cli

QUIET = ("--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false")
EMA = "--trainer.callbacks+=" + json.dumps(
    {"class_path": "EMAWeightAveraging", "init_args": {"decay": 0.9}})


def _fit(work, epochs: int, *extra):
    return run_cli("fit", "--config", str(ROOT / "configs" / "digits.yaml"),
                   "--trainer.max_epochs", str(epochs), *QUIET, *extra, cwd=work)


def _versions(work, name="digits") -> list[str]:
    return sorted(p.name for p in (work / "runs" / name).glob("version_*"))


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("ema")
    proc = _fit(work, 3, EMA)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work, work / "runs" / "digits" / "version_0"


def test_ema_validates_tests_and_exports_the_same_averaged_weights(ema_run):
    _, run = ema_run
    summary = json.loads((run / "metrics.json").read_text())
    card = read_card(run / "model.onnx")
    best = torch.load(next((run / "checkpoints").glob("best-*.ckpt")), weights_only=True)
    assert "current_model_state" in best  # EMA kept the raw weights apart from the averaged
    # The test metric Lightning recorded and the exported graph's own score on the same 269
    # test rows are one number, and so are the recorded and the graph's validation accuracy.
    assert summary["test"]["test/acc"] == pytest.approx(card.metrics["test/acc_onnx"], abs=1e-6)
    assert card.consistency.checked and card.consistency.rows == 269
    assert card.consistency.graph == pytest.approx(card.metrics["val/acc"], abs=1e-6)
    assert summary["test"]["test/acc"] > 0.9  # decay 0.9 suits a 57-step run


def test_export_refuses_a_checkpoint_whose_metrics_disagree_with_its_weights(ema_run, tmp_path):
    _, run = ema_run
    ckpt = torch.load(next((run / "checkpoints").glob("best-*.ckpt")), weights_only=True)
    ckpt["metrics"]["val/acc"] = 0.5
    lying = tmp_path / "lying.ckpt"
    torch.save(ckpt, lying)
    out = tmp_path / "m.onnx"
    proc = run_cli("export", "--ckpt", str(lying), "--out", str(out))
    line = assert_one_line_error(proc, "lying.ckpt", "val/acc=", "recorded 0.5000", "disagree")
    assert "nothing written" in line and not out.exists()

    ckpt["metrics"]["val/acc"] = read_card(run / "model.onnx").metrics["val/acc"]
    ckpt["validated_at_step"] = ckpt["global_step"] - 5  # weights newer than their metrics
    torch.save(ckpt, lying)
    proc = run_cli("export", "--ckpt", str(lying), "--out", str(out))
    assert_one_line_error(proc, "measured at step", "saved mid-epoch")
    assert not out.exists()


def test_validate_and_test_resolve_last_and_best_into_the_run_folder(ema_run):
    work, run = ema_run
    fit_test = json.loads((run / "metrics.json").read_text())["test"]["test/acc"]
    for command, flag in (("test", "best"), ("validate", "last")):
        proc = run_cli(command, "--config", str(ROOT / "configs" / "digits.yaml"),
                       "--ckpt_path", flag, *QUIET, EMA, cwd=work)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert _versions(work) == ["version_0"]  # evaluations add no run folders
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    result = json.loads((run / "eval" / f"test-{best.stem}" / "metrics.json").read_text())
    assert result["checkpoint"] == str(best) and result["metrics"]["test/acc"] == fit_test
    result = json.loads((run / "eval" / "validate-last" / "metrics.json").read_text())
    assert result["metrics"]["val/samples"] == 269 and result["metrics"]["val/acc"] > 0.9
    # the same checkpoint tested again (here on other rows): beside the earlier results
    before = {p: p.read_bytes() for p in (run / "eval").rglob("*") if p.is_file()}
    folders = set((run / "eval").iterdir())
    proc = run_cli("test", "--config", str(ROOT / "configs" / "digits.yaml"), "--ckpt_path",
                   "best", *QUIET, EMA, "--data.test_fraction", "0.3", cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p: p.read_bytes() for p in before} == before  # every earlier evaluation kept
    [added] = set((run / "eval").iterdir()) - folders
    assert re.fullmatch(rf"test-{best.stem}-[2-9]", added.name), added.name
    again = json.loads((added / "metrics.json").read_text())
    assert again["metrics"]["test/samples"] > result["metrics"]["val/samples"]


@pytest.mark.parametrize("command", ["test", "validate"])
def test_evaluation_without_a_checkpoint_is_refused(tmp_path, command):
    config = str(ROOT / "configs" / "digits.yaml")
    proc = run_cli(command, "--config", config, "--ckpt_path", "last", cwd=tmp_path)
    assert_one_line_error(proc, "--ckpt_path last", "no run with a checkpoint under runs/digits")
    proc = run_cli(command, "--config", config, cwd=tmp_path)
    assert_one_line_error(proc, "--ckpt_path is required")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # two fits; CI runs it (./scripts/test.sh --slow)
def test_a_cosine_run_is_extended_in_its_own_folder(tmp_path):
    cosine = ("--model.schedule", "cosine")
    assert _fit(tmp_path, 2, *cosine).returncode == 0
    proc = _fit(tmp_path, 3, *cosine, "--ckpt_path", "last")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cosine warm restart from step 38" in proc.stderr
    assert _versions(tmp_path) == ["version_0"]
    run = tmp_path / "runs" / "digits" / "version_0"
    steps = [{r.split(",")[0] for r in (run / name).read_text().splitlines()[1:]}
             for name in ("metrics-part1.csv", "metrics.csv")]  # nothing of the log is lost
    assert steps[0] and steps[1]
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["epochs"] == 3 and [e["epoch"] for e in summary["history"]] == [1, 2, 3]
    assert all(0 < s < 60 for s in summary["seconds_per_epoch"])
    assert summary["test"]["test/acc"] > 0.9
    training = read_card(run / "model.onnx").training
    assert training.run_epochs == 3 and 1 <= training.weights_epoch <= 3


@pytest.mark.slow
def test_onecycle_extension_and_a_changed_config_are_refused(tmp_path):
    assert _fit(tmp_path, 2).returncode == 0
    run = tmp_path / "runs" / "digits" / "version_0"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    proc = _fit(tmp_path, 3, "--ckpt_path", "last")
    assert_one_line_error(proc, "onecycle schedule planned for max_epochs=2", "--model.init_from",
                          "last.ckpt", after_run_log=True)
    proc = _fit(tmp_path, 2, "--ckpt_path", "last", "--model.dropout", "0.3")
    assert_one_line_error(proc, "model.dropout=0.1 in the run, 0.3 here", "--model.init_from",
                          after_run_log=True)
    assert _versions(tmp_path) == ["version_0"]
    assert {p: p.stat().st_mtime_ns for p in before} == before  # the run is untouched


def test_a_fit_that_fails_before_its_first_epoch_leaves_nothing(tmp_path):
    poison = "--trainer.callbacks+=" + json.dumps(
        {"class_path": "tests.helpers.PoisonLoss", "init_args": {"step": 1}})
    proc = _fit(tmp_path, 2, poison)
    assert_one_line_error(proc, "loss is nan in epoch 1", after_run_log=True)  # from 1
    assert _versions(tmp_path) == []


@pytest.mark.slow  # two fits; the rule itself: test_baseline_check_compares_with_the_best_constant
def test_a_model_no_better_than_a_constant_is_not_exported(tmp_path):
    """A learning rate too small to learn anything in one epoch: refused at export in one
    line with both scores; allowed, exported with a warning and the card says so."""
    tiny = ("--model.lr", "1e-9", "--model.schedule", "constant")
    proc = _fit(tmp_path, 1, *tiny)
    line = assert_one_line_error(proc, "no better than a constant answer", "val/acc",
                                 "for always answering class", after_run_log=True)
    assert "--export.allow_trivial true" in line
    assert not list((tmp_path / "runs").rglob("model.onnx"))
    proc = _fit(tmp_path, 1, *tiny, "--export.allow_trivial", "true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "WARNING: the model is no better than a constant answer" in proc.stderr
    (model,) = (tmp_path / "runs").rglob("model.onnx")
    from export.card import read_card

    baseline = read_card(model).baseline
    assert baseline.checked and not baseline.better
    assert baseline.model <= baseline.constant + 1 / 269


def test_a_run_that_never_validated_still_meets_the_baseline_gate(tmp_path):
    """No validation, so no recorded val/acc to check the graph against: the gate skipped
    the baseline too and exported the untrained net (test accuracy 0.10, exit 0). The graph's
    own validation score is what the baseline compares. (The run was `max_epochs 0`, which is
    now refused before the fit: one step at a vanishing rate leaves the net as untrained.)"""
    proc = _fit(tmp_path, 1, "--trainer.limit_val_batches", "0",
                "--trainer.limit_train_batches", "1", "--model.lr", "1e-12")
    assert_one_line_error(proc, "the model is no better than a constant answer",
                          after_run_log=True)
    assert not list((tmp_path / "runs").rglob("model.onnx"))


def test_an_ema_horizon_longer_than_the_run_is_refused_before_training(tmp_path):
    ema = "--trainer.callbacks+=" + json.dumps({"class_path": "EMAWeightAveraging"})
    proc = _fit(tmp_path, 3, ema)
    assert_one_line_error(proc, "EMAWeightAveraging: decay 0.999 averages over ~1,000 updates "
                          "but this run makes 57", after_run_log=True)
    assert not list((tmp_path / "runs").rglob("*.ckpt"))


def test_baseline_check_compares_with_the_best_constant():
    import numpy as np

    from export.card import Baseline, Card, Consistency
    from trainer.gates import TrivialModelError, baseline_check

    card = Card.from_json({
        "task": "classification", "class_names": ["a", "b", "c"],
        "outputs": ["logits", "probabilities"], "dataset": {"name": "d", "fingerprint": "0" * 64},
        "input": {"name": "features", "kind": "tabular", "dtype": "float32", "shape": [2],
                  "value_range": [0, 1]}})
    y = np.array([0] * 6 + [1] * 3 + [2])

    def acc(graph):
        return Consistency(checked=True, metric="val/acc", graph=graph, recorded=graph, rows=10)

    ok = baseline_check(acc(0.7), y, card, False, "m.ckpt")
    assert ok.better and ok.constant == 0.6 and ok.constant_answer == "class 'a'"
    with pytest.raises(TrivialModelError, match=r"m.ckpt: the model is no better than a "
                       r"constant answer \(val/acc 0.6000 on 10 validation rows vs 0.6000"):
        baseline_check(acc(0.6), y, card, False, "m.ckpt")
    assert not baseline_check(acc(0.6), y, card, True, "m.ckpt").better
    reg = card.replace(task="regression", class_names=(), outputs=("values",))
    values = np.array([1.0, 2.0, 3.0, 10.0])  # median 2.5: MAE 2.5

    def mae(graph):
        return Consistency(checked=True, metric="val/mae", graph=graph, recorded=graph, rows=4)

    assert baseline_check(mae(1.0), values, reg, False, "m").better
    with pytest.raises(TrivialModelError, match="always answering 2.5"):
        baseline_check(mae(2.5), values, reg, False, "m")
    assert baseline_check(Consistency(checked=False, reason="x"), y, card, False, "m") == \
        Baseline(checked=False, reason="x")
