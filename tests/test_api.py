"""The Python API for training scripts: `trainer.api.fit`, a plain lightning.Trainer, your
own nn.Module as the backbone (in Python and as a YAML class path), torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from export.card import read_card
from export.errors import InputError
from export.runtime import Predictor
from tests.conftest import ROOT, run_cli
from trainer.data.datamodule import FixedDataModule

# fp32 pinned: the runs below are compared with a plain Trainer's fp32 logits, and where bf16
# is native (AMX) the timed choice could take it on one run and not another.
ARGS = ["--seed_everything", "0", "--trainer.max_epochs", "3", "--trainer.accelerator", "cpu",
        "--trainer.precision", "32-true", "--trainer.enable_progress_bar", "false",
        "--data.source", "digits", "--model.arch", "mlp", "--model.width", "32"]


def _report(run) -> dict:
    """metrics.json without what differs between two identical runs: timings and paths."""
    report = json.loads((run / "metrics.json").read_text())
    for key in ("seconds_per_epoch", "samples_per_second", "phases", "hardware"):
        report.pop(key)
    report["history"] = [{k: v for k, v in e.items()
                          if k not in ("seconds", "samples_per_second", "train/samples_per_sec")}
                         for e in report["history"]]
    report["best"]["checkpoint"] = report["best"]["checkpoint"].split("/")[-1]
    return report


def _logits(model, x) -> np.ndarray:
    return Predictor(model).predict(x).logits


@pytest.mark.slow
def test_api_fit_is_trainer_fit_and_a_plain_trainer_trains_the_same_model(tmp_path):
    import lightning as L

    from trainer import api
    from trainer.callbacks import ExportOnnx
    from trainer.module import ClassifierModule

    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
              "init_args": {"save_dir": str(tmp_path / "api"), "name": "digits"}}
    result = api.fit(seed_everything=0, trainer={
        "max_epochs": 3, "accelerator": "cpu", "precision": "32-true",
        "enable_progress_bar": False, "logger": logger},
        data={"source": "digits"}, model={"arch": "mlp", "width": 32})
    assert result.run == tmp_path / "api" / "digits" / "version_0"
    assert result.model == result.run / "model.onnx" and result.model.is_file()
    assert result.metrics["epochs"] == 3 and result.metrics["test"]["test/acc"] > 0.8

    proc = run_cli("fit", *ARGS, cwd=tmp_path)  # the command, in its own process
    assert proc.returncode == 0, proc.stderr[-3000:]
    command = tmp_path / "runs" / "default" / "version_0"
    assert _report(command) == _report(result.run)

    L.seed_everything(0)  # a plain Trainer with Lightning's default checkpointing
    data = FixedDataModule(source="digits")
    export = ExportOnnx()
    L.Trainer(max_epochs=3, accelerator="cpu", default_root_dir=tmp_path / "plain",
              logger=False, enable_progress_bar=False, callbacks=[export]).fit(
        ClassifierModule(arch="mlp", width=32), data)

    x = data.splits["test"].arrays()[0]
    cards = [read_card(p) for p in (result.model, command / "model.onnx", export.path)]
    assert cards[0].training.weights_epoch == cards[2].training.weights_epoch == 3
    np.testing.assert_array_equal(_logits(result.model, x), _logits(command / "model.onnx", x))
    np.testing.assert_allclose(_logits(result.model, x), _logits(export.path, x), atol=1e-5)
    for field in ("class_names", "input", "normalization", "dataset", "calibration"):
        assert getattr(cards[0], field) == getattr(cards[2], field), field
    assert cards[0].metrics["test/acc_onnx"] == cards[2].metrics["test/acc_onnx"]


def test_api_fit_says_what_is_wrong_in_one_line(tmp_path):
    from trainer import api

    with pytest.raises(InputError, match=r"unknown section\(s\) \['modle'\]"):
        api.fit(modle={"width": 3})
    with pytest.raises(InputError) as bad:
        api.fit(model={"width": 0}, data={"source": "digits"})
    assert "model.width" in str(bad.value) and "\n" not in str(bad.value)
    # the sections travel through a temporary YAML file; the line names them, not it
    with pytest.raises(InputError, match=r"--trainer\.max_epochs \(from api\.fit's keyword "
                                         r"sections\): expected int"):
        api.fit(trainer={"max_epochs": "two"}, data={"source": "digits"})
    with pytest.raises(InputError, match="config file not found"):
        api.fit(tmp_path / "missing.yaml")
    # a string was read a character at a time ("unknown option -"); ints an AttributeError
    for args in ("--trainer.max_epochs 1", [1, 2]):
        with pytest.raises(InputError, match="args must be a list of command-line strings"):
            api.fit(args=args, data={"source": "digits"})
    # a group given a plain value reached the option checks as that value: AttributeError
    with pytest.raises(InputError, match="trainer: 5 in a config; expected a mapping"):
        api.fit(trainer=5, data={"source": "digits"})
    assert not (tmp_path / "runs").exists()


def _example(script: str, *args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_your_own_network_trains_exports_and_predicts_torch_free(tmp_path):
    proc = _example("custom_backbone.py", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = tmp_path / "out" / "model.onnx"
    card = read_card(model)
    assert card.training.model.backbone == {"class_path": "my_nets.SmallConv", "init_args": None,
                                              "object": True}
    assert card.parity.max_abs_diff <= 1e-3 and card.consistency.checked and card.baseline.better
    assert card.metrics["test/acc_onnx"] >= 0.85
    x, y = FixedDataModule(source="digits").splits["test"].arrays()
    np.savez(tmp_path / "test.npz", x=x, y=y)
    out = tmp_path / "pred.csv"
    proc = run_cli("predict", "--model", str(model), "--input", str(tmp_path / "test.npz"),
                   "--output", str(out), cwd=tmp_path)  # the deploy side: no torch
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(out.read_text().splitlines()) == len(y) + 1


@pytest.mark.slow
def test_a_backbone_as_a_yaml_class_path_is_rebuilt_by_trainer_export(tmp_path):
    spec = {"class_path": "examples.my_nets.SmallConv", "init_args": {"classes": 10, "width": 8}}
    proc = run_cli("fit", *ARGS[:-4], "--model.backbone", json.dumps(spec), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "default" / "version_0"
    fitted = read_card(run / "model.onnx")
    assert fitted.training.model.backbone == spec
    assert "training:    examples.my_nets.SmallConv" in run_cli(
        "inspect", str(run / "model.onnx")).stdout
    best = run / "checkpoints" / fitted.training.checkpoint
    proc = run_cli("export", "--ckpt", str(best), "--out", str(tmp_path / "again.onnx"),
                   cwd=tmp_path)  # a new process rebuilds the network from its class path
    assert proc.returncode == 0, proc.stderr[-3000:]
    x = FixedDataModule(source="digits").splits["test"].arrays()[0]
    np.testing.assert_array_equal(_logits(run / "model.onnx", x), _logits(tmp_path / "again.onnx", x))


NETS = '''
import torch
from torch import nn

class Wrong(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 7)
    def forward(self, x):
        return self.fc(x.flatten(1))

class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)
    def forward(self, x):
        out = self.fc(x.flatten(1))
        return out if out.sum() > 0 else -out

def not_a_module(**kwargs):
    raise AssertionError("called")
'''


@pytest.mark.parametrize("class_path, init_args, expected", [
    ("badnets.Wrong", {}, "model.backbone: badnets.Wrong must map the input to 10 logits per "
                          "row, (N, 10); it gives shape (2, 7)"),
    pytest.param("badnets.Branchy", {}, "model.backbone: badnets.Branchy cannot be exported "
                 "to ONNX by torch.onnx.export (dynamo): GuardOnDataDependentSymNode:",
                 marks=pytest.mark.slow),
    pytest.param("badnets.not_a_module", {}, "model.backbone: badnets.not_a_module is not an "
                 "nn.Module class", marks=pytest.mark.slow),
    pytest.param("nowhere.Net", {}, "model.backbone: cannot import nowhere.Net (No module "
                 "named 'nowhere')", marks=pytest.mark.slow),
    pytest.param("badnets.Wrong", {"depth": 3}, "model.backbone: badnets.Wrong(**{'depth': 3}) "
                 "failed: TypeError:", marks=pytest.mark.slow),
])
def test_a_bad_backbone_is_one_line_before_the_first_epoch(tmp_path, class_path, init_args,
                                                            expected):
    (tmp_path / "badnets.py").write_text(NETS)
    spec = json.dumps({"class_path": class_path, "init_args": init_args})
    proc = run_cli("fit", *ARGS[:-4], "--model.backbone", spec, cwd=tmp_path,
                   env={"PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"trainer fit: error: {expected}"), last
    assert "Epoch 1" not in proc.stderr and not list(tmp_path.glob("runs/*/*/checkpoints/*"))


def test_a_backbone_object_checkpoint_names_how_to_export_it(tmp_path):
    """A backbone handed over as an object keeps its class path only: `trainer export`
    says so in one line (the script's ExportOnnx exports it)."""
    import lightning as L
    from torch import nn

    from trainer.module import ClassifierModule

    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    L.seed_everything(0)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", default_root_dir=tmp_path,
                        logger=False, enable_progress_bar=False)
    trainer.fit(ClassifierModule(backbone=net), FixedDataModule(source="digits"))
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    proc = run_cli("export", "--ckpt", str(ckpt), "--out", str(tmp_path / "m.onnx"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "trainer export: error: model.backbone: torch.nn.modules.container.Sequential was "
        "handed over as a Python object, so its arguments are unknown here; export it from "
        "the script that built it (ExportOnnx), or give model.backbone as {class_path, "
        "init_args}"]
    assert not (tmp_path / "m.onnx").exists()


def test_a_datamodule_without_labels_is_one_line(tmp_path):
    np.savez(tmp_path / "x.npz", x=np.zeros((50, 4), np.float32))
    with pytest.raises(InputError, match=r"x\.npz: .*missing array 'y'"):
        FixedDataModule(source="arrays", root=str(tmp_path / "x.npz")).info


@pytest.mark.slow
def test_torchrun_trains_with_ddp_on_two_processes_and_exports_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         str(ROOT / "examples" / "ddp_torchrun.py"), str(tmp_path / "out"), "--cpu"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("exported") == 1 and "rank 0 of 2" in proc.stdout
    card = read_card(tmp_path / "out" / "model.onnx")
    # 1,259 training rows, 629 per rank, 19 batches of 32 per rank and epoch: each rank
    # trains on its own half (a single process would make 39 steps per epoch)
    assert card.training.global_step == 4 * 19
    assert card.parity.max_abs_diff <= 1e-3 and card.metrics["test/acc_onnx"] >= 0.85


_SCRIPT = r"""
import glob, json, os, signal, sys, threading, time
from trainer import api

before = [str(signal.getsignal(s)) for s in (signal.SIGTERM, signal.SIGINT)]
args = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--data.source", "digits", "--model.arch", "mlp", "--model.width", "8"]
out = {}

def in_thread():  # signals are the main thread's: a fit elsewhere runs without handlers
    try:
        out["thread"] = str(api.fit(trainer={"max_epochs": 1}, args=args).model)
    except BaseException as exc:
        out["thread"] = repr(exc)

worker = threading.Thread(target=in_thread)
worker.start()
worker.join()

def ctrl_c_after_the_first_checkpoint():
    while not glob.glob("runs/default/version_1/checkpoints/*.ckpt"):
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGINT)

threading.Thread(target=ctrl_c_after_the_first_checkpoint, daemon=True).start()
try:
    api.fit(trainer={"max_epochs": 1000}, args=args)
    out["main"] = "returned"
except KeyboardInterrupt as exc:
    out["main"] = str(exc)
out["handlers"] = [str(signal.getsignal(s)) for s in (signal.SIGTERM, signal.SIGINT)] == before
print(json.dumps(out))
"""


@pytest.mark.slow  # two short fits in one script
def test_api_fit_leaves_the_scripts_signals_as_they_were(tmp_path):
    """api.fit installed the CLI's SIGTERM/Ctrl-C handlers for good: after it, the script's
    Ctrl-C printed the fit's message and raised Preempted; in a thread it was a ValueError
    (signals are the main thread's); a Ctrl-C during it ended the script as SystemExit."""
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["thread"].endswith("runs/default/version_0/model.onnx"), out
    kept = "runs/default/version_1/checkpoints/last.ckpt"
    assert out["main"] == f"api.fit: interrupted; kept {kept}; resume with ckpt_path='last'"
    assert (tmp_path / kept).is_file() and out["handlers"], out
