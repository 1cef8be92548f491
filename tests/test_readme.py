"""The README's Python example runs as written, on the deploy side alone (torch poisoned)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import ROOT, poisoned_env

MARKER = "<!-- README example: run by tests/test_readme.py -->"


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    assert MARKER in text, "the README lost its tested Python example"
    block = re.search(r"```python\n(.*?)```", text[text.index(MARKER):], re.S)
    return block.group(1)


def test_the_predictor_example_runs_without_torch(digits_run, digits_test_npz, tmp_path):
    code = (readme_example()
            .replace("demo_out/model.onnx", str(digits_run / "model.onnx"))
            .replace("demo_out/digits_test.npz", str(digits_test_npz)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, env={**poisoned_env(tmp_path), "PATH": "/usr/bin:/bin"},
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()
    assert first.startswith("classification (1, 8, 8) ")
    labels = re.findall(r"'(\d)'", second)
    assert len(labels) == 4 and "[" in second.split("]", 1)[1]  # labels, then confidences
