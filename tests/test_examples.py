"""Every script in examples/ runs as a user would run it, and does what it says."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from export.card import read_card
from tests.conftest import ROOT


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


def test_a_plain_lightning_trainer_exports_a_gated_model(tmp_path):
    proc = _run("plain_trainer.py", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = re.search(r"exported (\S+): test accuracy ([0-9.]+), parity", proc.stdout)
    assert line, proc.stdout
    card = read_card(line.group(1))
    assert float(line.group(2)) >= 0.9 and card.parity.max_abs_diff <= 1e-3
    assert card.consistency.checked and card.baseline.better  # the gates ran
    assert card.training.checkpoint.startswith("epoch=3")  # Lightning's default checkpoint


def test_a_module_without_data_says_what_it_needs():
    from trainer.module import ClassifierModule

    model = ClassifierModule(arch="mlp")  # builds without data; learns it in setup
    try:
        model.setup("fit")
    except ValueError as exc:
        assert str(exc).count("\n") == 0 and "FixedDataModule" in str(exc)
    else:
        raise AssertionError("a module without data set itself up")


def test_a_run_that_saved_nothing_exports_its_final_weights(tmp_path):
    import lightning as L

    from trainer.callbacks import ExportOnnx
    from trainer.data.datamodule import FixedDataModule
    from trainer.module import ClassifierModule

    L.seed_everything(0)
    export = ExportOnnx()
    L.Trainer(max_epochs=3, accelerator="cpu", default_root_dir=tmp_path, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, callbacks=[export]).fit(
        ClassifierModule(arch="mlp", width=32), FixedDataModule(source="digits"))
    assert export.path == tmp_path / "model.onnx"
    card = read_card(export.path)
    assert card.training.checkpoint == "final.ckpt" and card.consistency.checked
    assert (tmp_path / "checkpoints" / "final.ckpt").is_file()


def test_the_example_refuses_a_file_as_its_folder_in_one_line(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    proc = _run("plain_trainer.py", str(notes))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"plain_trainer.py: error: {notes}: expected a folder for the run, this is a file"]
    assert notes.read_text() == "mine"


def test_every_example_is_run_by_a_test():
    scripts = {p.name for p in (ROOT / "examples").glob("*.py")} - {"my_nets.py"}  # a module
    tests = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    assert scripts and not {s for s in scripts if f'"{s}"' not in tests}
