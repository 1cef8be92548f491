"""scripts/gpu_check.sh, the one prepared GPU check (issue #28): without a GPU it says so
and exits 0; rehearsed on the CPU, every check runs and the report says PASS (the `cuda`
tests skip). On a GPU machine it is run by hand (the device tool), its report recorded in
docs/benchmarks.md."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from tests.conftest import ROOT


def _check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    proc = _check(str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines() == [
        "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); nothing to check"]
    assert not (tmp_path / "out").exists()


def test_a_file_as_the_report_folder_is_one_line_and_untouched(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    proc = _check(str(notes), "--rehearse-on-cpu")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"gpu_check: error: {notes}: expected a folder for the report, this is a file"]
    assert notes.read_text() == "mine"


@pytest.mark.slow
def test_a_rehearsal_on_the_cpu_runs_every_check(tmp_path):
    proc = _check(str(tmp_path / "out"), "--rehearse-on-cpu")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {r["check"]: r for r in json.loads((tmp_path / "out" / "gpu_check.json").read_text())}
    assert set(results) == {"machine", "cuda", "speedrun", "predict", "serve", "fp16 export",
                            "fp16 predict", "streaming"}
    assert {r["status"] for c, r in results.items() if c != "cuda"} == {"PASS"}
    assert len(results["speedrun"]["seeds"]) == 1 and all(
        s["time"].startswith("start ") for s in results["speedrun"]["seeds"])
    report = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| serve | PASS |" in report and "| streaming | PASS |" in report
