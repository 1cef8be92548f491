"""The deploy side runs without torch: numpy + onnxruntime + pillow only."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT, poisoned_env, run_cli


def test_importing_the_runtime_leaves_torch_out():
    code = ("import sys, export.runtime, export.batch, export.card, export.serve.supervisor, "
            "export.model_uri, trainer.cli; "
            "bad = sorted(m for m in ('torch', 'lightning', 'torchvision', 'torchmetrics', 'mlflow') "
            "if m in sys.modules); print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_help_predict_and_inspect_never_import_torch(digits_run, digits_test_npz, tmp_path):
    env = poisoned_env(tmp_path)
    assert run_cli("--help", env=env).returncode == 0
    for cmd in ("predict", "inspect", "export"):
        proc = run_cli(cmd, "--help", env=env)
        assert proc.returncode == 0, proc.stderr
    model = str(digits_run / "model.onnx")
    proc = run_cli("inspect", model, env=env)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "p.csv"
    proc = run_cli("predict", "--model", model, "--input", str(digits_test_npz),
                   "--output", str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()
