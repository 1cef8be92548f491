"""Runs and models in a real local MLflow store (SQLite in a temporary folder): a digits fit
with Lightning's MLFlowLogger, the logged onnx-flavor model, the registry, and
`trainer predict --model models:/...`; TensorBoard's logger the same way."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest

from export.runtime import Predictor
from tests.conftest import ROOT, assert_one_line_error, poisoned_env, run_cli

mlflow = pytest.importorskip("mlflow", reason="the tracking extra is not installed "
                                              "(pip install '.[tracking]')")


def _fit(work, *extra: str):
    proc = run_cli("fit", "--config", str(ROOT / "configs" / "digits.yaml"),
                   "--trainer.max_epochs", "3", "--trainer.enable_progress_bar", "false",
                   "--trainer.logger", "MLFlowLogger",
                   "--trainer.logger.tracking_uri", "sqlite:///mlruns.db",
                   "--trainer.logger.experiment_name", "digits",
                   "--export.register_as", "digits-model", *extra, cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    work = tmp_path_factory.mktemp("mlflow")
    _fit(work)
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlruns.db'}")
    return work


def _run(store):
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("digits")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time"])
    return client, runs[0]


def test_the_run_holds_config_params_epoch_metrics_and_artifacts(store):
    client, run = _run(store)
    params = run.data.params
    assert params["model.arch"] == "convnet"  # the resolved config
    assert params["trainer.max_epochs"] == "3"
    assert params["export.register_as"] == "digits-model"
    assert not any(k.startswith("data_info") for k in params)  # statistics stay in the card
    history = client.get_metric_history(run.info.run_id, "val/acc")
    assert len(history) == 3 and len({m.step for m in history}) == 3
    assert "test/acc" in run.data.metrics
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.json", "curves.png", "confusion_matrix.png"} <= top
    model = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/MLmodel", "model/model.onnx", "model/input_example.json"} <= model
    folder = next((store / "runs" / "digits").glob("version_*"))
    logged = mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                 artifact_path="metrics.json")
    assert json.loads(Path(logged).read_text()) == json.loads((folder / "metrics.json").read_text())
    assert run.data.tags["frozenfit.task"] == "classification"
    assert run.data.tags["frozenfit.dataset_fingerprint"] == \
        Predictor(folder / "model.onnx").card.dataset.fingerprint


def test_the_logged_model_predicts_like_the_predictor(store, digits_test_npz):
    _, run = _run(store)
    folder = next((store / "runs" / "digits").glob("version_*"))
    predictor = Predictor(folder / "model.onnx")
    with np.load(digits_test_npz) as npz:
        x = npz["x"][:32]
    uri = f"runs:/{run.info.run_id}/model"
    want = predictor.predict(x)
    graph = mlflow.onnx.load_model(uri)
    assert hashlib.sha256(graph.SerializeToString()).hexdigest() == \
        hashlib.sha256(folder.joinpath("model.onnx").read_bytes()).hexdigest()
    out = mlflow.pyfunc.load_model(uri).predict(x)
    np.testing.assert_allclose(out["probabilities"], want.probabilities, atol=1e-6)
    info = mlflow.models.get_model_info(uri)
    assert info.signature.inputs.input_names() == [predictor.spec.name]
    version = mlflow.MlflowClient().get_model_version("digits-model", "1")
    assert version.run_id == run.info.run_id
    assert "classification" in version.description and "fingerprint" in version.description


def test_predict_resolves_mlflow_uris(store, digits_test_npz, tmp_path):
    _, run = _run(store)
    folder = next((store / "runs" / "digits").glob("version_*"))
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlruns.db'}"}
    outputs = {}
    for name, model in (("path", str(folder / "model.onnx")), ("registry", "models:/digits-model/1"),
                        ("run", f"runs:/{run.info.run_id}/model")):
        out = tmp_path / f"{name}.csv"
        proc = run_cli("predict", "--model", model, "--input", str(digits_test_npz),
                       "--output", str(out), "--no-progress", env=env, cwd=store)
        assert proc.returncode == 0, proc.stderr
        assert "Downloading artifacts" not in proc.stderr  # MLflow's bar, into a log file
        outputs[name] = out.read_text()
    assert outputs["path"] == outputs["registry"] == outputs["run"]
    pytest.importorskip("uvicorn", reason="the serve extra is not installed")
    from tests.test_serve import Server

    server = Server("models:/digits-model/1", tmp_path, env=env)
    try:
        with np.load(digits_test_npz) as npz:
            status, doc = server.predict(npz["x"][:3].tolist())
        assert status == 200, doc
        assert doc["model_sha256"] == hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()
        # on the inference protocol, by its registered name, as a KServe or Triton client asks
        status, body, _ = server.request("GET", "/v2/models/digits-model/versions/1")
        assert status == 200 and json.loads(body)["name"] == "digits-model", body
    finally:
        assert server.stop()[0] == 0
    proc = run_cli("predict", "--model", "models:/digits-model/9", "--input",
                   str(digits_test_npz), "--output", str(tmp_path / "x.csv"), env=env, cwd=store)
    assert_one_line_error(proc, "models:/digits-model/9", "cannot resolve through MLflow")
    assert not (tmp_path / "x.csv").exists()


def test_a_uri_without_a_tracking_store_is_refused_and_creates_nothing(digits_test_npz,
                                                                       tmp_path):
    proc = run_cli("predict", "--model", "models:/digits-model/1", "--input",
                   str(digits_test_npz), "--output", str(tmp_path / "p.csv"),
                   env={"MLFLOW_TRACKING_URI": ""}, cwd=tmp_path)
    assert_one_line_error(proc, "models:/digits-model/1", "MLFLOW_TRACKING_URI")
    assert list(tmp_path.iterdir()) == []  # MLflow's default store would be ./mlflow.db


def test_without_mlflow_each_command_names_the_extra(digits_test_npz, tmp_path):
    env = poisoned_env(tmp_path, ("mlflow",))
    proc = run_cli("predict", "--model", "models:/digits-model/1", "--input",
                   str(digits_test_npz), "--output", str(tmp_path / "p.csv"), env=env)
    assert_one_line_error(proc, "tracking extra", "pip install '.[tracking]'")
    proc = run_cli("fit", "--config", str(ROOT / "configs" / "digits.yaml"),
                   "--trainer.logger", "MLFlowLogger", env=env, cwd=tmp_path)
    assert_one_line_error(proc, "MLFlowLogger", "tracking extra")
    proc = run_cli("fit", "--config", str(ROOT / "configs" / "digits.yaml"),
                   "--export.register_as", "m", cwd=tmp_path)
    assert_one_line_error(proc, "--export.register_as", "MLFlowLogger")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_second_fit_registers_version_2_and_predicts_the_same(store, digits_test_npz, tmp_path):
    _fit(store, "--seed_everything", "1")
    client = mlflow.MlflowClient()
    versions = sorted(int(v.version) for v in client.search_model_versions("name='digits-model'"))
    assert versions == [1, 2]
    folder = max((store / "runs" / "digits").glob("version_*"))
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlruns.db'}"}
    texts = []
    for model in (str(folder / "model.onnx"), "models:/digits-model/2"):
        out = tmp_path / f"{len(texts)}.csv"
        proc = run_cli("predict", "--model", model, "--input", str(digits_test_npz),
                       "--output", str(out), "--no-progress", env=env, cwd=store)
        assert proc.returncode == 0, proc.stderr
        texts.append(out.read_text())
    assert texts[0] == texts[1]


@pytest.mark.slow
def test_tensorboard_logs_the_same_run(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    proc = run_cli("fit", "--config", str(ROOT / "configs" / "digits.yaml"),
                   "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
                   "--trainer.logger", "TensorBoardLogger", "--trainer.logger.save_dir", "runs",
                   "--trainer.logger.name", "tb", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "tb" / "version_0"
    assert {"model.onnx", "metrics.json", "config.yaml"} <= {p.name for p in run.iterdir()}
    events = EventAccumulator(str(run))
    events.Reload()
    assert len(events.Scalars("val/acc")) == 2
    assert "model.width" in (run / "hparams.yaml").read_text()


@pytest.mark.slow
def test_serve_follows_an_alias_under_load_and_refuses_a_version_that_differs(
        digits_run, digits_test_npz, tmp_path, monkeypatch):
    """The alias moves from version 1 to 2 while 8 threads send 2,000 requests: every one is
    answered 200, each thread sees version 1 and then only version 2, and the SHA-256 always
    matches the version; a version whose classes differ is refused and 2 stays."""
    pytest.importorskip("uvicorn", reason="the serve extra is not installed")
    import threading

    import onnx

    from tests.test_serve import Server

    monkeypatch.chdir(tmp_path)  # the default experiment's artifacts: ./mlruns, not the checkout's
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns.db'}")
    client, shas = mlflow.MlflowClient(), {}
    for version, change in ((1, None), (2, "retrained"), (3, "classes")):
        model = onnx.load(str(digits_run / "model.onnx"))
        model.doc_string = change or ""
        if change == "classes":
            card = next(p for p in model.metadata_props if p.key == "frozenfit.card")
            card.value = json.dumps({**json.loads(card.value),
                                     "class_names": [f"c{i}" for i in range(10)]})
        with mlflow.start_run():
            mlflow.onnx.log_model(model, name="model", registered_model_name="live")
        shas[str(version)] = hashlib.sha256(model.SerializeToString()).hexdigest()
    client.set_registered_model_alias("live", "champion", "1")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}"}
    assert_one_line_error(run_cli("serve", "--model", "models:/live@nosuch", env=env),
                          "models:/live@nosuch", "has no alias 'nosuch'")
    server = Server("models:/live@champion", tmp_path, "--poll-s", "0.2", env=env)
    with np.load(digits_test_npz) as npz:
        x = npz["x"][:20]
    seen, errors = [[] for _ in range(8)], []

    def client_thread(k):
        for i in range(250):
            status, doc = server.predict(x[i % 20:i % 20 + 1].tolist())
            if status != 200:
                errors.append((status, doc))
                return
            seen[k].append((doc["model_version"], doc["model_sha256"]))

    try:
        threads = [threading.Thread(target=client_thread, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        while sum(map(len, seen)) < 500 and not errors:
            time.sleep(0.02)
        client.set_registered_model_alias("live", "champion", "2")
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors[:3]
        assert sum(map(len, seen)) == 2000
        for answers in seen:
            versions = [v for v, _ in answers]
            assert versions == sorted(versions), "a thread went back to version 1"
            assert all(shas[v] == sha for v, sha in answers)
        assert {v for a in seen for v, _ in a} == {"1", "2"}
        client.set_registered_model_alias("live", "champion", "3")  # other class names
        time.sleep(3)
        status, doc = server.predict(x[:1].tolist())
        assert status == 200 and doc["model_version"] == "2"
        metrics = server.metrics()
        assert metrics["frozenfit_model_swaps_total"] == 1
        assert metrics["frozenfit_model_load_failures_total"] >= 1
    finally:
        code, _, err = server.stop()
    assert code == 0, err
    assert "moved to version 2: now serving sha256" in err
    assert "not loaded: its class_names differs" in err and "still serving sha256" in err


def test_a_registry_model_is_served_under_its_registered_name():
    from export.model_uri import registered_name
    from export.serve.options import ServeOptions

    uris = ("models:/digits/3", "models:/digits@champion", "runs:/abc/model", "model.onnx")
    assert [registered_name(u) for u in uris] == ["digits", "digits", None, None]
    assert ServeOptions(uri="models:/digits@champion").name == "digits"
    assert ServeOptions(uri="models:/digits/1", name="d2").name == "d2"  # --name wins
    # a registered name that is no URL path segment: the file's stem, as before
    assert ServeOptions(uri="models:/my model/1").name is None
    assert ServeOptions(uri="runs:/abc/model").name is None
