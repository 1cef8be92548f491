"""Exact, safe retraining: determinism, resume after SIGTERM and SIGKILL, refusal of a
checkpoint from other data or another architecture, warm start, and the NaN guard."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPRODUCIBLE, ROOT, assert_one_line_error, run_cli

EPOCHS = "3"  # digits: 19 steps per epoch at batch 64


def _fit(work, *extra, pinned=REPRODUCIBLE):
    proc = run_cli("fit", "--config", str(ROOT / "configs" / "digits.yaml"),
                   "--trainer.max_epochs", EPOCHS, "--trainer.enable_progress_bar", "false",
                   "--export.enabled", "false", *pinned, *extra, cwd=work)
    return proc


def _last(work, version: int) -> dict:
    return torch.load(work / "runs" / "digits" / f"version_{version}" / "checkpoints" /
                      "last.ckpt", weights_only=True)


def _signal_at(step: int, name: str) -> str:
    return "--trainer.callbacks+=" + json.dumps(
        {"class_path": "tests.helpers.SignalAtStep",
         "init_args": {"step": step, "signal_name": name}})


def _same_training(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    timing = "train/samples_per_sec"  # wall-clock throughput differs run to run
    assert {k: v for k, v in a["metrics"].items() if k != timing} == \
        {k: v for k, v in b["metrics"].items() if k != timing}


def _report(work, version: int) -> dict:
    """metrics.json without what differs between two identical runs: timings and paths."""
    report = json.loads((work / "runs" / "digits" / f"version_{version}" / "metrics.json")
                        .read_text())
    timing = {"seconds", "samples_per_second", "train/samples_per_sec"}
    for key in ("seconds_per_epoch", "samples_per_second", "phases"):
        report.pop(key)
    report["history"] = [{k: v for k, v in e.items() if k not in timing}
                         for e in report["history"]]
    report["best"]["checkpoint"] = report["best"]["checkpoint"].split("/")[-1]
    report["hardware"] = report["hardware"]["precision"]  # its reason quotes a timing
    return report


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run, twice: the same seed and config give identical results."""
    work = tmp_path_factory.mktemp("reference")
    for _ in range(2):
        assert _fit(work).returncode == 0
    first, second = _last(work, 0), _last(work, 1)
    _same_training(first, second)
    assert _report(work, 0) == _report(work, 1)
    return first, _report(work, 0)


@pytest.mark.parametrize("signal_name,stopped_at",
                         [("SIGTERM", 30), pytest.param("SIGINT", 30, marks=pytest.mark.slow),
                          ("SIGKILL", 19)])
def test_interrupted_run_resumes_exactly(reference, tmp_path, signal_name, stopped_at):
    proc = _fit(tmp_path, _signal_at(30, signal_name))
    if signal_name == "SIGTERM":  # saves a mid-epoch checkpoint and exits cleanly
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "SIGTERM: saved" in proc.stderr
    elif signal_name == "SIGINT":  # Ctrl-C: the same, and the command that resumes
        assert proc.returncode == 130, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert "trainer fit: interrupted; kept " in last and "last.ckpt" in last, last
        assert last.endswith("--ckpt_path last") and "resume with: trainer fit --config" in last
    else:
        assert proc.returncode == -9
    assert _last(tmp_path, 0)["global_step"] == stopped_at

    proc = _fit(tmp_path, "--ckpt_path", "last")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fit: checkpoint" in proc.stderr and "version_0" in proc.stderr
    assert f"complete epochs, step {stopped_at})" in proc.stderr  # where it resumes
    assert "exists and is not empty" not in proc.stderr  # the run's own folder: expected
    # The resume continues in its own run folder, and its report describes the whole run as
    # the uninterrupted run's does (timings aside).
    assert sorted(p.name for p in (tmp_path / "runs" / "digits").iterdir()) == ["version_0"]
    _same_training(_last(tmp_path, 0), reference[0])
    assert _report(tmp_path, 0) == reference[1]
    seconds = json.loads((tmp_path / "runs" / "digits" / "version_0" / "metrics.json")
                         .read_text())["seconds_per_epoch"]
    assert len(seconds) == 3 and all(0 < s < 60 for s in seconds)


def test_a_resumed_run_keeps_the_hardware_choices_of_its_checkpoint(tmp_path):
    proc = _fit(tmp_path, _signal_at(10, "SIGTERM"), pinned=())  # precision, layout: auto
    assert proc.returncode == 0, proc.stderr[-2000:]
    chosen = _last(tmp_path, 0)["hardware"]
    assert "a quick check ran NHWC at" in chosen["layout_reason"]
    proc = _fit(tmp_path, "--ckpt_path", "last", pinned=())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "kept from the checkpoint on resume" in proc.stderr
    record = json.loads((tmp_path / "runs" / "digits" / "version_0" / "metrics.json")
                        .read_text())["hardware"]
    assert record["reason"].endswith("kept from the checkpoint on resume")
    assert (record["precision"], record["channels_last"]) == \
        (chosen["precision"], chosen["channels_last"])


@pytest.mark.slow  # a whole fit
def test_a_fit_started_with_ctrl_c_ignored_keeps_ignoring_it(reference, tmp_path):
    """A script's background job (`trainer fit ... &`) starts with SIGINT ignored, so the
    script's Ctrl-C does not stop it; fit installed its own Ctrl-C handler over that."""
    import signal
    import subprocess
    import sys

    argv = [sys.executable, "-m", "trainer", "fit", "--config",
            str(ROOT / "configs" / "digits.yaml"), "--trainer.max_epochs", EPOCHS,
            "--trainer.enable_progress_bar", "false", "--export.enabled", "false",
            *REPRODUCIBLE, _signal_at(10, "SIGINT")]
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert proc.returncode == 0 and "interrupted" not in proc.stderr, proc.stderr[-2000:]
    _same_training(_last(tmp_path, 0), reference[0])


def _other_digits(tmp_path):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.rint(255 - d.images * (255 / 16)).astype(np.uint8)[:, None]  # inverted digits
    np.savez(tmp_path / "other.npz", x=x, y=d.target)
    return str(tmp_path / "other.npz")


@pytest.mark.slow  # two refusal fits; the resume tests above stay in the default run
def test_resume_refuses_other_data_and_other_architecture(reference, tmp_path):
    assert _fit(tmp_path).returncode == 0
    ckpt = tmp_path / "runs" / "digits" / "version_0" / "checkpoints" / "last.ckpt"
    other = ("--data.source", "arrays", "--data.root", _other_digits(tmp_path))
    # A checkpoint in its run folder is checked against the run's config.yaml up front ...
    proc = _fit(tmp_path, "--ckpt_path", str(ckpt), *other)
    assert_one_line_error(proc, "data.source='digits' in the run, 'arrays' here",
                          "--model.init_from", after_run_log=True)
    proc = _fit(tmp_path, "--ckpt_path", str(ckpt), "--model.width", "16")
    assert_one_line_error(proc, "model.width=32 in the run, 16 here", after_run_log=True)
    # ... a loose copy by the hyperparameters and data fingerprint it carries.
    loose = tmp_path / "loose.ckpt"
    loose.write_bytes(ckpt.read_bytes())
    proc = _fit(tmp_path, "--ckpt_path", str(loose), *other)
    assert_one_line_error(proc, "--ckpt_path", "dataset fingerprint", "--model.init_from",
                          after_run_log=True)
    proc = _fit(tmp_path, "--ckpt_path", str(loose), "--model.width", "16")
    assert_one_line_error(proc, "model.width=32", "same architecture", after_run_log=True)
    # trainer test of it on other data is told how other labelled data are scored instead
    proc = run_cli("test", "--config", str(ROOT / "configs" / "digits.yaml"), "--ckpt_path",
                   str(loose), "--trainer.enable_progress_bar", "false", *other, cwd=tmp_path)
    assert_one_line_error(proc, "dataset fingerprint", "export it and run trainer predict",
                          after_run_log=True)
    assert "resume" not in proc.stderr.strip().splitlines()[-1]
    # ... and by its split: the same data split otherwise (as a version that drew copies of a
    # file apart did) would train on other rows
    state = torch.load(loose, weights_only=True)
    state["hyper_parameters"]["data_info"]["dataset"]["split_sizes"]["train"] -= 1
    torch.save(state, loose)
    proc = _fit(tmp_path, "--ckpt_path", str(loose))
    assert_one_line_error(proc, "--ckpt_path: the checkpoint's splits were", "resume needs the "
                          "same split", "--model.init_from", after_run_log=True)
    # The refused runs left no folders behind.
    assert sorted(p.name for p in (tmp_path / "runs" / "digits").iterdir()) == ["version_0"]


def test_warm_start_from_another_datasets_weights(reference, tmp_path):
    assert _fit(tmp_path).returncode == 0
    ckpt = str(tmp_path / "runs" / "digits" / "version_0" / "checkpoints" / "last.ckpt")
    proc = _fit(tmp_path, "--model.init_from", ckpt, "--data.source", "arrays",
                "--data.root", _other_digits(tmp_path), "--trainer.max_epochs", "1",
                "--export.enabled", "true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "copied" in proc.stderr and "tensors" in proc.stderr
    # lineage: the card names the parent's file and its content
    from export.card import read_card
    from export.jobstate import sha256_file

    model = tmp_path / "runs" / "digits" / "version_1" / "model.onnx"
    card = read_card(model)
    assert card.training.parent_sha256 == sha256_file(Path(ckpt))
    shown = run_cli("inspect", str(model)).stdout
    assert f"lineage:     started from {ckpt} (sha256 {card.training.parent_sha256[:16]}" in shown
    # another network shares none of its weights: it copied only the metrics' counters and
    # trained from scratch while it said "copied 14 of 36 tensors"
    proc = _fit(tmp_path, "--model.init_from", ckpt, "--model.arch", "mlp")
    assert_one_line_error(proc, f"--model.init_from {ckpt}: none of its weights has the name "
                          "and shape of one of this model's", after_run_log=True)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    poison = "--trainer.callbacks+=" + json.dumps(
        {"class_path": "tests.helpers.PoisonLoss", "init_args": {"step": 25}})
    proc = _fit(tmp_path, poison)
    assert_one_line_error(proc, "loss is nan in epoch 2, step 25", "last good checkpoint is kept",
                          after_run_log=True)
    last = _last(tmp_path, 0)
    assert last["global_step"] == 19  # the end of the first epoch, before the poison
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


@pytest.mark.slow
def test_a_streamed_run_resumes_exactly_after_sigkill(tmp_path):
    """The streaming path (block-shuffled reads from the memory-mapped rows, a DataLoader
    worker) resumes bit for bit like the in-memory one."""
    streamed = ("--data.memory_budget_gb", "1e-9", "--data.num_workers", "1")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir(), killed.mkdir()
    proc = _fit(whole, *streamed)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _fit(killed, *streamed, _signal_at(30, "SIGKILL")).returncode == -9
    assert _last(killed, 0)["global_step"] == 19
    proc = _fit(killed, *streamed, "--ckpt_path", "last")
    assert proc.returncode == 0, proc.stderr[-2000:]
    _same_training(_last(killed, 0), _last(whole, 0))
