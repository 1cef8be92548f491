"""Champion against challenger: the paired tests (against scipy and hand counts), `trainer
compare` on two real digits models (one epoch and six), and `trainer promote` on a real
local MLflow store (SQLite): set, gated move, refusal without a move, rollback, and
`models:/NAME@ALIAS` resolved by predict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from export.compare import compare_classifiers, compare_regressors, meets
from tests.conftest import ROOT, assert_one_line_error, run_cli


def test_mcnemar_counts_only_the_rows_one_model_gets_right():
    a = np.array([True] * 80 + [False] * 20)        # champion: 80%
    b = np.array([True] * 70 + [False] * 10 + [True] * 20)  # challenger: 90%
    c = compare_classifiers(a, b, alpha=0.05, margin=0.0)
    assert (c.champion_only, c.challenger_only) == (10, 20)
    from scipy.stats import binomtest

    assert c.p_value == pytest.approx(binomtest(20, 30, 0.5, alternative="greater").pvalue)
    assert c.improvement == pytest.approx(0.1)
    low, high = c.improvement_interval
    assert low < 0.1 < high and c.verdict == ("better" if low > 0 else "not worse"
                                              if low >= 0 else "inconclusive")


def test_a_model_against_itself_is_not_worse_and_not_better():
    right = np.random.default_rng(0).random(500) < 0.9
    c = compare_classifiers(right, right, alpha=0.05, margin=0.0)
    assert c.improvement == 0 and c.improvement_interval == (0.0, 0.0)
    assert c.verdict == "not worse" and meets(c.verdict, "not-worse")
    assert not meets(c.verdict, "better")
    err = np.abs(np.random.default_rng(1).normal(size=400))
    r = compare_regressors(err, err, alpha=0.05, margin=0.0)
    assert r.verdict == "not worse" and r.improvement == 0


def test_a_clearly_better_and_a_clearly_worse_regressor():
    rng = np.random.default_rng(2)
    err_a = np.abs(rng.normal(0, 1.0, 2000))
    err_b = err_a * 0.8  # every row 20% closer
    assert compare_regressors(err_a, err_b, 0.05, 0.0).verdict == "better"
    assert compare_regressors(err_b, err_a, 0.05, 0.0).verdict == "worse"
    # a margin wide enough makes the slightly worse one acceptable
    close = err_a + rng.normal(0.01, 0.01, 2000)
    assert compare_regressors(err_a, close, 0.05, 0.0).verdict in ("worse", "inconclusive")
    assert compare_regressors(err_a, close, 0.05, 0.1).verdict == "not worse"


@pytest.fixture(scope="session")
def weak_digits_run(tmp_path_factory) -> Path:
    """The digits recipe for one epoch: a real model, clearly weaker than the six-epoch
    `digits_run`."""
    work = tmp_path_factory.mktemp("weak_run")
    proc = run_cli("fit", "--config", str(ROOT / "configs" / "digits.yaml"),
                   "--trainer.max_epochs", "1", "--model.lr", "0.001",
                   "--trainer.enable_progress_bar", "false",
                   "--trainer.logger.init_args.save_dir", str(work / "runs"), cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return next((work / "runs" / "digits").glob("version_*"))


def _compare(champion, challenger, data, *extra, env=None):
    return run_cli("compare", "--champion", str(champion), "--challenger", str(challenger),
                   "--data", str(data), *extra, env=env)


def test_compare_calls_the_strong_model_better_and_the_weak_one_worse(
        digits_run, weak_digits_run, digits_test_npz, tmp_path):
    strong, weak = digits_run / "model.onnx", weak_digits_run / "model.onnx"
    report = tmp_path / "report.json"
    proc = _compare(weak, strong, digits_test_npz, "--require", "better", "--json", str(report))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(report.read_text())
    c = doc["comparison"]
    assert doc["meets"] and c["verdict"] == "better" and c["challenger"] > c["champion"]
    assert c["champion_only"] + c["challenger_only"] > 0 and c["p_value"] < 0.05
    assert "verdict: better" in proc.stdout and "champion: " in proc.stdout
    assert "exact McNemar" in proc.stdout and not c["same_model"] and "same model" not in \
        proc.stdout
    proc = _compare(strong, weak, digits_test_npz)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "verdict: worse" in proc.stdout and "NOT met" in proc.stdout
    same = _compare(strong, strong, digits_test_npz)
    assert same.returncode == 0 and "verdict: not worse" in same.stdout
    assert "the champion and the challenger are the same model" in same.stdout
    assert _compare(strong, strong, digits_test_npz, "--require", "better").returncode == 1


def test_compare_refusals_are_one_line(digits_run, digits_test_npz, tmp_path):
    strong = digits_run / "model.onnx"
    np.savez(tmp_path / "nolabels.npz", x=np.load(digits_test_npz)["x"])
    assert_one_line_error(_compare(strong, strong, tmp_path / "nolabels.npz"),
                          "nolabels.npz", "no labels")
    bad = np.load(digits_test_npz)
    np.savez(tmp_path / "badlabels.npz", x=bad["x"], y=bad["y"] + 20)
    assert_one_line_error(_compare(strong, strong, tmp_path / "badlabels.npz"),
                          "outside the", "classes")
    assert_one_line_error(_compare(strong, strong, digits_test_npz, "--alpha", "0.7"),
                          "--alpha 0.7")
    assert_one_line_error(_compare(strong, strong, digits_test_npz, "--margin", "-1"),
                          "--margin -1")
    # points where a fraction is meant: a margin that every challenger meets is no gate
    assert_one_line_error(_compare(strong, strong, digits_test_npz, "--margin", "5"),
                          "--margin 5", "0.01 is one point")
    assert_one_line_error(_compare(strong, strong, digits_test_npz, "--json",
                                   str(digits_test_npz)), "--json")
    from sklearn.datasets import load_wine

    wine = load_wine()
    header = ",".join([*wine.feature_names, "cultivar"])
    rows = [",".join([*(f"{v:.6g}" for v in r), str(t)]) for r, t in zip(wine.data, wine.target)]
    (tmp_path / "wine.csv").write_text("\n".join([header, *rows]) + "\n")
    proc = run_cli("fit", "--config", str(ROOT / "configs" / "tabular.yaml"), "--data.root",
                   "wine.csv", "--data.target", "cultivar", "--trainer.max_epochs", "5",
                   "--trainer.enable_progress_bar", "false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = next((tmp_path / "runs").rglob("model.onnx"))
    line = assert_one_line_error(_compare(strong, table, digits_test_npz), "model card field")
    assert "class_names" in line or "input." in line


def _register(store, name: str, model) -> None:
    import mlflow
    import onnx

    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlruns.db'}")
    with mlflow.start_run():
        mlflow.onnx.log_model(onnx.load(str(model)), name="model",
                              registered_model_name=name)


@pytest.mark.slow
def test_promote_moves_the_alias_only_through_the_gate_and_rolls_back(
        digits_run, weak_digits_run, digits_test_npz, tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="the tracking extra: pip install '.[tracking]'")
    from export.jobstate import sha256_file

    strong, weak = digits_run / "model.onnx", weak_digits_run / "model.onnx"
    monkeypatch.chdir(tmp_path)  # the default experiment's artifacts: ./mlruns, not the checkout's
    for model in (weak, strong, weak):  # versions 1, 2, 3
        _register(tmp_path, "digits", model)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}"}

    def promote(*args):
        return run_cli("promote", "digits", "--alias", "champion", *args, env=env,
                       cwd=tmp_path)

    proc = promote("--version", "1")
    assert proc.returncode == 0 and "unset -> version 1" in proc.stdout, proc.stderr
    proc = promote("--version", "2", "--data", str(digits_test_npz), "--require", "better")
    assert proc.returncode == 0 and "version 1 -> version 2 (better)" in proc.stdout, proc.stderr
    proc = promote("--data", str(digits_test_npz))  # the newest, 3: the weak model again
    assert proc.returncode == 1 and "stays at version 2" in proc.stdout, proc.stdout
    out = tmp_path / "p.csv"
    shown = run_cli("inspect", "models:/digits@champion", env=env)
    assert shown.returncode == 0 and "task:        classification" in shown.stdout, shown.stderr
    proc = run_cli("predict", "--model", "models:/digits@champion", "--input",
                   str(digits_test_npz), "--output", str(out), "--no-progress", env=env)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "p.summary.json").read_text())
    import mlflow

    version_2 = Path(mlflow.artifacts.download_artifacts("models:/digits/2",
                                                         dst_path=str(tmp_path / "v2")))
    assert summary["model_sha256"] == sha256_file(next(version_2.rglob("*.onnx")))
    proc = promote("--rollback")
    assert proc.returncode == 0 and "version 2 -> 1 (rollback)" in proc.stdout, proc.stderr
    assert_one_line_error(promote("--version", "9"), "--version 9", "versions 1, 2, 3")
    mlflow.MlflowClient().set_registered_model_tag("digits", "frozenfit.alias.champion", "{x")
    assert_one_line_error(promote("--rollback"), "frozenfit.alias.champion", "fix or delete")
    assert_one_line_error(run_cli("promote", "nosuch", "--alias", "champion", env=env),
                          "nosuch")
    assert_one_line_error(run_cli("compare", "--champion", "models:/digits@nosuch",
                                  "--challenger", str(strong), "--data",
                                  str(digits_test_npz), env=env), "models:/digits@nosuch")


def test_an_alias_mlflow_reserves_is_refused_in_one_line(tmp_path):
    # MLflow names versions v1, v2, ... and the newest `latest`: setting such an alias was
    # its MlflowException traceback after the gate had run
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}"}
    for alias in ("v1", "V12", "latest", "Latest"):
        assert_one_line_error(run_cli("promote", "digits", "--alias", alias, env=env,
                                      cwd=tmp_path), f"alias {alias!r}: reserved by MLflow")
    assert not (tmp_path / "mlruns.db").exists()


def test_regressors_compare_by_mae(tmp_path):
    """Diabetes (real, from scikit-learn): a model against itself is not worse; the same
    recipe for one epoch at a learning rate too small to move (its outputs stay near 0 for
    targets around 150) is worse by MAE, exit 1."""
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    lines = [",".join([*data.feature_names, "progression"])]
    lines += [",".join(f"{v:.6g}" for v in (*r, t)) for r, t in zip(data.data, data.target)]
    (tmp_path / "diabetes.csv").write_text("\n".join(lines) + "\n")
    recipe = ["--config", str(ROOT / "configs" / "tabular.yaml"), "--data.root", "diabetes.csv",
              "--data.target", "progression", "--data.task", "regression"]
    proc = run_cli("fit", *recipe, "--trainer.max_epochs", "30",
                   "--trainer.enable_progress_bar", "false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = next((tmp_path / "runs" / "tabular").glob("version_*"))
    assert run_cli("data", *recipe, "--split", "test", "--out", str(tmp_path / "test.npz"),
                   cwd=tmp_path).returncode == 0
    model, test = run / "model.onnx", tmp_path / "test.npz"
    same = _compare(model, model, test)
    assert same.returncode == 0 and "verdict: not worse" in same.stdout, same.stdout
    assert "mae" in same.stdout and "paired bootstrap" in same.stdout
    proc = run_cli("fit", *recipe, "--trainer.max_epochs", "1", "--model.lr", "1e-5",
                   "--export.allow_trivial",
                   "true", "--trainer.logger.init_args.name", "weak",
                   "--trainer.enable_progress_bar", "false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    weak = next((tmp_path / "runs" / "weak").glob("version_*")) / "model.onnx"
    worse = _compare(model, weak, test, "--json", str(tmp_path / "r.json"))
    assert worse.returncode == 1 and "verdict: worse" in worse.stdout, worse.stdout
    doc = json.loads((tmp_path / "r.json").read_text())["comparison"]
    assert doc["metric"] == "mae" and doc["challenger"] > doc["champion"]
    # a folder of tables with a file that is not one: named with compare's own option
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "diabetes.csv").write_text((tmp_path / "diabetes.csv").read_text())
    (tmp_path / "mixed" / "notes.txt").write_text("not a table\n")
    assert_one_line_error(_compare(model, model, tmp_path / "mixed"), "notes.txt", "(--data)")
