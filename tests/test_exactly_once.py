"""Exactly once, or refused: batch jobs under double launches, changed inputs, damaged
state, a full disk and a hung graph; a fit pre-empted at its very end; empty targets."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from tests.conftest import REPRODUCIBLE, ROOT, assert_one_line_error, run_cli
from tests.helpers import looping_model

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainer", *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, timeout=60.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def _ids(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return [row["id"] for row in csv.DictReader(f)]


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def big_input(tmp_path_factory):
    work = tmp_path_factory.mktemp("big")
    x = np.random.default_rng(0).integers(0, 255, (200_000, 1, 8, 8), dtype=np.uint8)
    np.save(work / "big.npy", x)
    return work / "big.npy"


def _predict_args(model, source, out, *extra):
    return ["predict", "--model", str(model), "--input", str(source), "--output", str(out),
            "--no-progress", *extra]


def test_a_second_job_on_the_same_output_is_refused_naming_the_first(digits_run, big_input,
                                                                      tmp_path):
    out = tmp_path / "p.csv"
    first = _start(*_predict_args(digits_run / "model.onnx", big_input, out, "--chunk-rows",
                                  "2000"))
    lock = tmp_path / ".p.csv.partial" / "lock"
    _wait_for(lambda: lock.is_file() and lock.read_text().strip() == str(first.pid))
    second = run_cli(*_predict_args(digits_run / "model.onnx", big_input, out))
    assert_one_line_error(second, "p.csv", f"PID {first.pid}", "another trainer predict job")
    assert first.wait(120) == 0, first.stderr.read()
    ids = _ids(out)
    assert len(ids) == len(set(ids)) == 200_000  # one complete output, no interleaving
    summary = json.loads((tmp_path / "p.summary.json").read_text())
    assert summary["rows"] == 200_000 and not (tmp_path / ".p.csv.partial").exists()


def _kill_after_parts(args, partial: Path, parts: int) -> None:
    job = _start(*args)
    _wait_for(lambda: len(list(partial.glob("part-*.json"))) >= parts)
    job.send_signal(signal.SIGKILL)
    job.wait()


def test_resume_refuses_an_image_folder_that_changed(digits_run, tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(600):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(images / f"{i:04d}.png")
    out = tmp_path / "p.csv"
    args = _predict_args(digits_run / "model.onnx", images, out, "--chunk-rows", "10",
                         "--batch-size", "10")
    _kill_after_parts(args, tmp_path / ".p.csv.partial", 3)
    for i in range(600, 650):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(images / f"{i:04d}.png")
    lock = ".p.csv.partial/lock"  # holds the PID of whichever job last took the state
    before = {k: v for k, v in _hashes(tmp_path).items() if k != lock}
    proc = run_cli(*args, "--resume")
    assert_one_line_error(proc, "cannot --resume", "input changed", "50 images added")
    assert {k: v for k, v in _hashes(tmp_path).items() if k != lock} == before  # untouched
    proc = run_cli(*args)  # a fresh run predicts every image exactly once
    assert proc.returncode == 0, proc.stderr
    assert sorted(_ids(out)) == [f"{i:04d}.png" for i in range(650)]


@pytest.mark.parametrize("added", [False, True])
def test_a_resume_does_not_trust_a_damaged_image_listing(digits_run, tmp_path, added):
    """The job's own list of its images (images.tsv) was read as it lay: emptied, the resumed
    job wrote an output missing the rest of the images; a byte changed, a JSONDecodeError
    traceback. When the folder is unchanged, the new listing (the same lines: the identity is
    their SHA-256) is read; when it changed, the identity says how."""
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(400):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(images / f"{i:04d}.png")
    reference, out = tmp_path / "ref.csv", tmp_path / "p.csv"
    args = _predict_args(digits_run / "model.onnx", images, out, "--chunk-rows", "10",
                         "--batch-size", "10")
    assert run_cli(*_predict_args(digits_run / "model.onnx", images, reference, "--chunk-rows",
                                  "10", "--batch-size", "10")).returncode == 0
    _kill_after_parts(args, tmp_path / ".p.csv.partial", 3)
    listing = tmp_path / ".p.csv.partial" / "images.tsv"
    listing.write_bytes(b"" if not added else b"\x00" + listing.read_bytes()[1:])
    if added:
        Image.new("L", (8, 8)).save(images / "9999.png")
    proc = run_cli(*args, "--resume")
    if added:
        assert_one_line_error(proc, "cannot --resume", "its images changed: 400 listed when "
                              "its output was written, 401 now")
        return
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == reference.read_bytes()

@pytest.mark.parametrize("damage", ["part deleted", pytest.param("record deleted", marks=pytest.mark.slow),
                                    pytest.param("part changed", marks=pytest.mark.slow)])
def test_a_damaged_partial_state_is_redone(digits_run, big_input, tmp_path, damage):
    reference = tmp_path / "ref.csv"
    assert run_cli(*_predict_args(digits_run / "model.onnx", big_input, reference,
                                  "--chunk-rows", "2000")).returncode == 0
    out = tmp_path / "p.csv"
    args = _predict_args(digits_run / "model.onnx", big_input, out, "--chunk-rows", "2000")
    partial = tmp_path / ".p.csv.partial"
    _kill_after_parts(args, partial, 6)
    victim = partial / "part-000002"
    if damage == "part deleted":
        (victim.with_suffix(".csv")).unlink()
    elif damage == "record deleted":
        (victim.with_suffix(".json")).unlink()
    else:
        with open(victim.with_suffix(".csv"), "a") as f:
            f.write("999999,1,0.5\n")
    proc = run_cli(*args, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == reference.read_bytes()
    summary = json.loads((tmp_path / "p.summary.json").read_text())
    assert summary["resumed_after_rows"] == 2 * 2000 and summary["rows"] == 200_000


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (needs root: CI and the dev machines run as root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_and_leaves_earlier_files_intact(digits_run, big_input,
                                                                 small_disk):
    (small_disk / "keep.txt").write_text("a user's file")
    (small_disk / "p.csv").write_text("id,label\nprevious,output\n")
    before = _hashes(small_disk)
    proc = run_cli(*_predict_args(digits_run / "model.onnx", big_input, small_disk / "p.csv"))
    line = assert_one_line_error(proc, "No space left on device", "--resume")
    assert "Traceback" not in proc.stderr, line
    after = _hashes(small_disk)
    assert {k: after[k] for k in before} == before  # pre-existing files untouched
    # What remains is the resumable state of the job, nothing else.
    assert all(k.startswith(".p.csv.partial/") for k in after.keys() - before.keys())

    best = next((digits_run / "checkpoints").glob("best-*.ckpt"))
    filler = small_disk / "filler"
    with open(filler, "wb") as f:  # leave less room than a model needs
        try:
            f.write(b"\0" * (4 << 20))
        except OSError:
            pass
    proc = run_cli("export", "--ckpt", str(best), "--out", str(small_disk / "model.onnx"))
    assert_one_line_error(proc, "No space left on device")
    assert not (small_disk / "model.onnx").exists()
    assert not [p for p in small_disk.iterdir() if p.name.startswith(".model.onnx")]


def _fill(disk: Path, leave: int) -> None:
    """Fill the tmpfs until about `leave` bytes are free."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


@pytest.mark.slow  # the full-disk batch test stays in the default run
def test_a_full_disk_under_data_fit_and_the_image_cache(small_disk, tmp_path):
    (small_disk / "keep.txt").write_text("a user's file")
    _fill(small_disk, 8 << 10)
    before = _hashes(small_disk)
    digits = str(ROOT / "configs" / "digits.yaml")
    proc = run_cli("data", "--config", digits, "--out", str(small_disk / "d.npz"))
    assert_one_line_error(proc, "No space left on device")
    proc = run_cli("fit", "--config", digits, "--trainer.max_epochs", "1",
                   "--trainer.logger.init_args.save_dir", str(small_disk / "runs"), cwd=tmp_path)
    assert_one_line_error(proc, "No space left on device", after_run_log=True)
    images = tmp_path / "imgs"
    for cls in ("a", "b"):
        for i in range(40):
            _png_noise(images / cls / f"{i}.png", i)
    proc = run_cli("fit", "--config", str(ROOT / "configs" / "image_folder.yaml"), "--data.root",
                   str(images), "--data.cache_dir", str(small_disk / "cache"), cwd=tmp_path)
    assert_one_line_error(proc, "No space left on device")
    with open(small_disk / "filler2", "wb") as f:  # no room left for the listing, which is
        try:  # written first, in the cache folder
            f.write(b"\0" * (16 << 10))
        except OSError:
            pass
    proc = run_cli("data", "--config", str(ROOT / "configs" / "image_folder.yaml"),
                   "--data.root", str(images), "--data.cache_dir", str(small_disk / "cache2"),
                   "--out", str(tmp_path / "d.npz"), cwd=tmp_path)
    assert_one_line_error(proc, "No space left on device", str(small_disk / "cache2"))
    after = _hashes(small_disk)
    assert {k: after[k] for k in before} == before  # nothing that was there changed
    assert not [k for k in after if k.endswith(".tmp")]  # no half-written file is left


def _png_noise(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_a_hung_graph_fails_after_the_batch_timeout(digits_run, digits_test_npz, tmp_path):
    model = tmp_path / "hung.onnx"
    looping_model(digits_run, model)
    start = time.perf_counter()
    proc = run_cli(*_predict_args(model, digits_test_npz, tmp_path / "p.csv",
                                  "--timeout-per-batch", "1"), timeout=120)
    assert_one_line_error(proc, "rows 0-255", "took longer than --timeout-per-batch 1 s")
    assert time.perf_counter() - start < 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hung.onnx"]


def test_a_batch_timeout_past_what_the_os_can_wait_is_no_timeout(digits_run, digits_test_npz,
                                                                  tmp_path):
    # the timer thread raised OverflowError (a traceback on stderr, exit 0) for inf or 1e10
    for seconds in ("inf", "1e10"):
        proc = run_cli(*_predict_args(digits_run / "model.onnx", digits_test_npz,
                                      tmp_path / f"p{seconds}.csv", "--timeout-per-batch",
                                      seconds))
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        assert (tmp_path / f"p{seconds}.csv").stat().st_size > 0


@pytest.mark.slow
def test_sigterm_during_the_export_resumes_to_the_same_run(tmp_path):
    config = ["--config", str(ROOT / "configs" / "digits.yaml"), "--trainer.max_epochs", "2",
              "--trainer.enable_progress_bar", "false", *REPRODUCIBLE]
    reference, work = tmp_path / "reference", tmp_path / "work"
    for folder in (reference, work):
        folder.mkdir()
    assert run_cli("fit", *config, cwd=reference).returncode == 0
    signal_at_export = "--trainer.callbacks+=" + json.dumps(
        {"class_path": "tests.helpers.SignalAtHook", "init_args": {"hook": "on_fit_end"}})
    proc = run_cli("fit", *config, signal_at_export, cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "stopped by SIGTERM before the run finished; `trainer fit ... --ckpt_path last` completes it")
    run = work / "runs" / "digits" / "version_0"
    assert not (run / "model.onnx").exists() and not (run / "metrics.json").exists()

    proc = run_cli("fit", *config, "--ckpt_path", "last", cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done, ref = run, reference / "runs" / "digits" / "version_0"
    names = {p.name for p in ref.iterdir()}
    assert names <= {p.name for p in done.iterdir()}
    timing = {"seconds", "samples_per_second", "train/samples_per_sec"}

    def report(folder):
        r = json.loads((folder / "metrics.json").read_text())
        r.pop("seconds_per_epoch"), r.pop("samples_per_second"), r.pop("phases")  # timings
        r["history"] = [{k: v for k, v in e.items() if k not in timing} for e in r["history"]]
        r["best"]["checkpoint"] = Path(r["best"]["checkpoint"]).name
        r["hardware"] = r["hardware"]["precision"]  # its reason quotes the check's timing
        return r

    assert report(done) == report(ref)
    from export.card import read_card

    a, b = (read_card(f / "model.onnx").to_json() for f in (done, ref))
    for card in (a, b):  # what differs between any two runs: times, and files holding them
        card.pop("created"), card["metrics"].pop("train/samples_per_sec")
        card["training"].pop("checkpoint_sha256"), card["training"].pop("config_yaml")
        card["training"]["hardware"] = card["training"]["hardware"]["precision"]
    assert a == b
    graphs = [onnx.load(str(f / "model.onnx")).graph.SerializeToString() for f in (done, ref)]
    assert graphs[0] == graphs[1]  # the same frozen weights, bit for bit


def test_an_empty_target_cell_is_refused_naming_the_row(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("a,b,label\n1,2,x\n2,3,y\n3,4,\n4,5,x\n")
    proc = run_cli("fit", "--config", str(ROOT / "configs" / "tabular.yaml"), "--data.root",
                   str(table), "--data.target", "label", cwd=tmp_path)
    assert_one_line_error(proc, "t.csv: row 2, target column 'label' is empty")
    assert not (tmp_path / "runs").exists()
