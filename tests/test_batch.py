"""The torch-free batch job: formats, top-k, summary, errors, resume after a kill,
bounded memory on a million rows, and drift on real MNIST."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

from export.batch import JobOptions, run_batch
from export.errors import InputError
from export.runtime import Predictor
from tests.conftest import MNIST, ROOT, assert_one_line_error, requires_mnist, run_cli


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_formats_agree_and_summary_is_written(digits_run, digits_test_npz, tmp_path):
    model = digits_run / "model.onnx"
    outs = {}
    for fmt in ("csv", "jsonl", "parquet"):
        out = tmp_path / f"p.{fmt}"
        summary = run_batch(model, digits_test_npz, out, JobOptions(top_k=3, chunk_rows=100,
                                                                      progress=False))
        assert summary.rows == 269 and summary.metrics["accuracy"] >= 0.95
        outs[fmt] = out
    csv_rows = _rows(outs["csv"])
    jsonl_rows = [json.loads(line) for line in outs["jsonl"].read_text().splitlines()]
    import pyarrow.parquet as pq

    pq_rows = pq.read_table(outs["parquet"]).to_pylist()
    assert len(csv_rows) == len(jsonl_rows) == len(pq_rows) == 269
    assert [r["label"] for r in csv_rows] == [r["label"] for r in jsonl_rows] == \
        [r["label"] for r in pq_rows]
    first = jsonl_rows[0]
    assert "top1_label" not in first  # label and confidence are the first of the top k
    assert first["confidence"] >= first["top2_confidence"] >= first["top3_confidence"]
    assert first["top2_label"] != first["label"]
    summary = json.loads((tmp_path / "p.summary.json").read_text())
    import onnxruntime as ort

    # `auto` takes CUDA when onnxruntime offers it, else the CPU.
    auto = "CUDAExecutionProvider" if "CUDAExecutionProvider" in ort.get_available_providers() \
        else "CPUExecutionProvider"
    assert summary["provider"] == auto and len(summary["model_sha256"]) == 64
    assert summary["rows_per_second"] > 0 and summary["seconds"] > 0
    drift = json.loads((tmp_path / "p.drift.json").read_text())
    # The held-out test split against the validation reference: no alarm, and 269 rows
    # against 269 are too few to rule out a shift of PSI 0.1: inconclusive, never ok.
    assert drift["status"] == "inconclusive" and drift["rows"] == 269
    assert drift["rows_needed"] > 269
    assert [c["name"] for c in drift["checks"]] == ["pixel mean", "pixel std", "confidence",
                                                     "predicted classes"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_fail_on_drift_exits_3_after_writing_every_output(digits_run, digits_test_npz, tmp_path):
    with np.load(digits_test_npz) as npz:
        x, y = npz["x"], npz["y"]
    np.savez(tmp_path / "inverted.npz", x=(x.max() - x).astype(x.dtype), y=y)
    model = str(digits_run / "model.onnx")
    shifted = run_cli("predict", "--model", model, "--input", str(tmp_path / "inverted.npz"),
                      "--output", str(tmp_path / "s.csv"), "--fail-on-drift", "warn")
    assert shifted.returncode == 3, shifted.stderr[-2000:]
    assert "drift report is drift (--fail-on-drift warn); exit 3" in shifted.stderr
    assert len(_rows(tmp_path / "s.csv")) == 269 and (tmp_path / "s.drift.json").is_file()
    clean = run_cli("predict", "--model", model, "--input", str(digits_test_npz),
                    "--output", str(tmp_path / "c.csv"), "--fail-on-drift", "warn")
    assert clean.returncode == 0, clean.stderr[-2000:]  # inconclusive is no alarm
    assert "drift: INCONCLUSIVE" in clean.stdout and "rows to be seen" in clean.stdout


def test_predictor_providers_and_card_checks(digits_run, tmp_path):
    import onnxruntime as ort

    p = Predictor(digits_run / "model.onnx", provider="auto")
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    assert p.provider == ("CUDAExecutionProvider" if has_cuda else "CPUExecutionProvider")
    assert Predictor(digits_run / "model.onnx", provider="cpu").provider == "CPUExecutionProvider"

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(InputError, match=r"--provider cuda: onnxruntime offers only"):
            Predictor(digits_run / "model.onnx", provider="cuda")
    import onnx

    model = onnx.load(str(digits_run / "model.onnx"))
    card = next(m for m in model.metadata_props if m.key == "frozenfit.card")
    card.value = card.value.replace('"card_version": 2', '"card_version": 99')
    assert '"card_version": 99' in card.value
    onnx.save(model, str(tmp_path / "future.onnx"))
    with pytest.raises(InputError, match=r"model card version 99 is not supported"):
        Predictor(tmp_path / "future.onnx")
    x = np.zeros((3, 1, 8, 8), np.uint8)
    pred = p.predict(x, batch_size=2)
    assert pred.labels.shape == (3,) and pred.probabilities.shape == pred.logits.shape == (3, 10)


def _image_folder(root, n=6):
    for i in range(n):
        cls = str(i % 2)
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8), 40 * i).save(root / cls / f"{i}.png")
    return root


def test_one_image_file_is_an_input(digits_run, tmp_path):
    """`--input photo.png`: one row, its id the file's name, labelled when its folder names
    a class, the same answer as within its folder; a broken one is one line either way."""
    root = _image_folder(tmp_path / "imgs")
    model = str(digits_run / "model.onnx")
    whole, one = tmp_path / "all.csv", tmp_path / "one.csv"
    assert run_cli("predict", "--model", model, "--input", str(root), "--output",
                   str(whole)).returncode == 0
    proc = run_cli("predict", "--model", model, "--input", str(root / "1" / "3.png"),
                   "--output", str(one))
    assert proc.returncode == 0, proc.stderr
    [row] = _rows(one)
    assert row["id"] == "3.png" and row["true_label"] == "1"
    assert {k: v for k, v in row.items() if k != "id"} == \
        {k: v for r in _rows(whole) if r["id"] == "1/3.png" for k, v in r.items() if k != "id"}
    (root / "broken.png").write_bytes(b"not a png")
    for extra in ((), ("--on-error", "skip")):
        proc = run_cli("predict", "--model", model, "--input", str(root / "broken.png"),
                       "--output", str(tmp_path / "b.csv"), *extra)
        assert_one_line_error(proc, "broken.png", "cannot decode image")
        assert not (tmp_path / "b.csv").exists()


def test_image_folder_on_error_fail_and_skip(digits_run, tmp_path):
    root = _image_folder(tmp_path / "imgs")
    (root / "1" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "p.csv"
    proc = run_cli("predict", "--model", str(digits_run / "model.onnx"), "--input", str(root),
                   "--output", str(out))
    assert_one_line_error(proc, "broken.png", "cannot decode image")
    assert not out.exists() and not list(tmp_path.glob(".p.csv*"))
    proc = run_cli("predict", "--model", str(digits_run / "model.onnx"), "--input", str(root),
                   "--output", str(out), "--on-error", "skip")
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 unreadable inputs" in proc.stdout and "broken.png" in proc.stdout
    rows = _rows(out)
    assert len(rows) == 6 and {r["id"] for r in rows} == {f"{i % 2}/{i}.png" for i in range(6)}
    assert "true_label" in rows[0]  # folders named after classes carry labels
    summary = json.loads((tmp_path / "p.summary.json").read_text())
    assert len(summary["skipped"]) == 1 and "broken.png" in summary["skipped"][0]


def _tables(folder):
    """A folder of Parquet files (the way tables are kept, read as one table), given to a
    model of images."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "sub").mkdir(parents=True)
    pq.write_table(pa.table({"f0": [1.0, 2.0]}), folder / "sub" / "part-0.parquet")


def _zip_member(path, name: str, data: bytes) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(name, data)


@pytest.mark.parametrize("make,needle", [
    (lambda d: np.savez(d / "in.npz", x=np.zeros((4, 3, 8, 8), np.uint8)), "got shape (4, 3, 8, 8)"),
    (lambda d: np.savez(d / "in.npz", x=np.zeros((4, 1, 8, 8), np.int32)), "got dtype int32"),
    (lambda d: (d / "in").mkdir(), "no PNG or JPEG images found"),
    (lambda d: _tables(d / "in"), "in (chunk 0): the model takes images and this input is a "
     "table (2 rows x 0 numeric columns)"),
    (lambda d: (d / "in.npz").write_bytes(b"garbage"), "cannot read arrays"),
    (lambda d: _zip_member(d / "in.npz", "x", b"not an array"),  # (numpy hands it over as
     "in.npz: 'x' is not a NumPy array (its zip member is not an .npy)"),  # bytes: a traceback)
])
def test_bad_inputs_leave_no_output(digits_run, tmp_path, make, needle):
    make(tmp_path)
    source = next(p for p in tmp_path.iterdir() if p.name.startswith("in"))
    out = tmp_path / "p.csv"
    proc = run_cli("predict", "--model", str(digits_run / "model.onnx"), "--input", str(source),
                   "--output", str(out))
    assert_one_line_error(proc, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == [source.name]


@pytest.mark.parametrize("name", ["SIGKILL", pytest.param("SIGINT", marks=pytest.mark.slow),
                                  pytest.param("SIGTERM", marks=pytest.mark.slow)])
def test_killed_job_resumes_without_losing_or_duplicating_rows(digits_run, tmp_path, name):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (300_000, 1, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "big.npy", x)
    model = str(digits_run / "model.onnx")
    args = ["--model", model, "--input", str(tmp_path / "big.npy"), "--chunk-rows", "3000",
            "--no-progress"]
    reference = tmp_path / "ref.csv"
    assert run_cli("predict", *args, "--output", str(reference)).returncode == 0

    out = tmp_path / "p.csv"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    job = subprocess.Popen([sys.executable, "-m", "trainer", "predict", *args, "--output",
                            str(out)], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    partial = tmp_path / ".p.csv.partial"
    deadline = time.time() + 60
    while len(list(partial.glob("part-*.json"))) < 5 and time.time() < deadline:
        time.sleep(0.02)
    job.send_signal(getattr(signal, name))
    _, err = job.communicate(timeout=60)
    if name == "SIGKILL":
        assert job.returncode == -9
    else:  # Ctrl-C or a scheduler's SIGTERM: one line, the parts kept, how to resume
        assert job.returncode == {"SIGINT": 130, "SIGTERM": 143}[name], err
        assert err.strip().splitlines() == [
            f"trainer predict: stopped by {name}; the complete parts are kept: run the same "
            f"command with --resume to finish"], err
    done = len(list(partial.glob("part-*.json")))
    assert 5 <= done < 100 and not out.exists()

    proc = run_cli("predict", *args, "--output", str(out), "--resume")
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == reference.read_bytes()
    summary = json.loads((tmp_path / "p.summary.json").read_text())
    assert summary["resumed_after_rows"] >= done * 3000 and summary["rows"] == 300_000
    assert not partial.exists()


def test_a_stop_while_the_batch_timer_starts_leaves_no_thread_holding_the_process(
        digits_run, digits_test_npz, monkeypatch):
    """A Ctrl-C or SIGTERM handled while the per-batch timer thread starts (Thread.start
    waits, and signal handlers run there) once left the timer alive: the process hung until
    it fired (--timeout-per-batch, 600 s). Here the stop lands exactly there."""
    import threading

    predictor = Predictor(digits_run / "model.onnx")
    x = np.load(digits_test_npz)["x"][:8]
    started = threading.Timer.start

    def start_then_stop(self):
        started(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(threading.Timer, "start", start_then_stop)
    with pytest.raises(KeyboardInterrupt):
        predictor.predict(x, timeout=600)
    monkeypatch.undo()
    time.sleep(0.1)
    timers = [t for t in threading.enumerate() if isinstance(t, threading.Timer)]
    assert all(t.daemon or not t.is_alive() for t in timers), timers


def test_resume_refuses_a_different_job(digits_run, digits_test_npz, tmp_path):
    out = tmp_path / "p.csv"
    partial = tmp_path / ".p.csv.partial"
    partial.mkdir()
    (partial / "job.json").write_text(json.dumps({"model": "someone else's"}))
    with pytest.raises(InputError, match="cannot --resume"):
        run_batch(digits_run / "model.onnx", digits_test_npz, out,
                  JobOptions(resume=True, progress=False))


@pytest.mark.slow
@requires_mnist
def test_drift_on_real_mnist(tmp_path_factory):
    work = tmp_path_factory.mktemp("mnist")
    proc = run_cli("fit", "--config", str(ROOT / "configs" / "mnist.yaml"), "--data.root",
                   str(MNIST), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "60",
                   "--model.width", "16", "--trainer.enable_progress_bar", "false",
                   "--trainer.logger.init_args.save_dir", str(work / "runs"), cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = next((work / "runs" / "mnist").glob("version_*")) / "model.onnx"
    opts = JobOptions(progress=False)
    clean = run_batch(model, MNIST / "t10k-images-idx3-ubyte.gz", work / "clean.csv", opts)
    assert clean.rows == 10000 and clean.metrics["accuracy"] > 0.85
    assert clean.drift_status == "ok", clean.drift_table

    from export.readers import read_idx

    x = read_idx(MNIST / "t10k-images-idx3-ubyte.gz")[:, None]
    noise = np.random.default_rng(0).normal(0, 80, x.shape)
    for name, shifted in (("inverted", 255 - x),
                          ("noised", np.clip(x + noise, 0, 255).astype(np.uint8))):
        np.save(work / f"{name}.npy", shifted)
        report = run_batch(model, work / f"{name}.npy", work / f"{name}.csv", opts)
        drift = json.loads((work / f"{name}.drift.json").read_text())
        assert report.drift_status == "drift", report.drift_table
        mean = next(c for c in drift["checks"] if c["name"] == "pixel mean")
        assert mean["status"] == "drift" and mean["p_adjusted"] < 1e-6 and mean["psi"] > 0.25


def test_thread_count_is_chosen_by_a_quick_check_and_recorded(digits_run, digits_test_npz,
                                                               tmp_path, monkeypatch):
    from export.runtime import predictor_for_job
    from export.timing import CHECKS

    monkeypatch.setenv("FROZENFIT_CACHE", str(tmp_path / "cache"))
    predictor, record = predictor_for_job(digits_run / "model.onnx", "cpu")
    assert "a quick check on 256 rows ran 1 thread at" in record["reason"]
    assert "remembered" not in record["reason"]
    want = 1 if record["threads"] == 1 else 0  # 0: onnxruntime's one per physical core
    assert predictor.session.get_session_options().intra_op_num_threads == want
    # The answer is remembered for this machine, model and batch; another batch is checked
    again, record_again = predictor_for_job(digits_run / "model.onnx", "cpu")
    assert record_again == {"threads": record["threads"], "reason": record["reason"] +
                            f" (remembered from an earlier run: {CHECKS})"}
    assert again.session.get_session_options().intra_op_num_threads == want
    assert "remembered" not in predictor_for_job(digits_run / "model.onnx", "cpu",
                                                 batch_size=128)[1]["reason"]
    # An API server takes its threads only when they are clearly faster (here a tiny model)
    predictor, record = predictor_for_job(digits_run / "model.onnx", "cpu", batch_size=64,
                                          server_threads=2)
    ratio = float(record["reason"].split(" at ")[1].split("x")[0])  # 1 thread's time / 2's
    if abs(ratio - 1 / 0.9) > 0.01:  # (the reason's ratio is rounded)
        assert record["threads"] == (2 if ratio > 1 / 0.9 else 1), record
    assert predictor.session.get_session_options().intra_op_num_threads == record["threads"]
    _, record = predictor_for_job(digits_run / "model.onnx", "cpu", server_threads=1)
    assert record["threads"] == 1 and "core(s)" in record["reason"]
    _, record = predictor_for_job(digits_run / "model.onnx", "cpu", threads=3)
    assert record == {"threads": 3, "reason": "set by --threads"}
    out = tmp_path / "p.csv"
    proc = run_cli("predict", "--model", str(digits_run / "model.onnx"), "--input",
                   str(digits_test_npz), "--output", str(out), "--threads", "2")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "p.summary.json").read_text())
    assert summary["threads"] == {"threads": 2, "reason": "set by --threads"}


def test_absurd_sizes_are_bounded_or_refused_in_one_line(digits_run, digits_test_npz, tmp_path):
    model = str(digits_run / "model.onnx")
    args = ["--model", model, "--input", str(digits_test_npz), "--no-progress"]
    # a batch larger than anything the job holds: the batches are the chunk's rows
    proc = run_cli("predict", *args, "--output", str(tmp_path / "a.csv"),
                   "--batch-size", "100000000")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(_rows(tmp_path / "a.csv")) == 269
    proc = run_cli("predict", *args, "--output", str(tmp_path / "b.csv"),
                   "--chunk-rows", "100000000000")
    assert_one_line_error(proc, "--chunk-rows 100,000,000,000: a chunk of this model's input",
                          "GiB available")
    assert not (tmp_path / "b.csv").exists()


def test_an_npz_larger_than_the_memory_available_is_refused_before_it_is_read(
        digits_run, tmp_path, monkeypatch):
    """An .npz is read whole: 3 MB of zip can hold gigabytes of zeros, which would fill the
    machine with no line. The memory available is set low here (the arrays are real)."""
    from export import readers

    np.savez_compressed(tmp_path / "z.npz", x=np.zeros((40_000, 1, 8, 8), np.uint8))
    assert (tmp_path / "z.npz").stat().st_size < 100_000  # 2.4 MiB of pixels
    monkeypatch.setattr(readers, "available_memory", lambda: 1 << 20)
    with pytest.raises(InputError, match=r"z\.npz: array 'x' is 2 MiB once read, "
                                         r"more than the 1 MiB of memory available"):
        run_batch(digits_run / "model.onnx", tmp_path / "z.npz", tmp_path / "p.csv",
                  JobOptions(progress=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["z.npz"]
    monkeypatch.setattr(readers, "available_memory", lambda: 3 << 20)
    run_batch(digits_run / "model.onnx", tmp_path / "z.npz", tmp_path / "p.csv",
              JobOptions(progress=False))
    assert len(_rows(tmp_path / "p.csv")) == 40_000


def test_image_listings_stream_and_name_each_change(tmp_path):
    """An image input is listed into a file, not held (export/jobstate.write_listing); a
    resume refused for a changed folder names what changed by walking both listings."""
    import os

    from export.jobstate import describe_listing_change, read_listing, write_listing
    from export.readers import iter_image_files

    root = _image_folder(tmp_path / "imgs", n=6)
    (root / "1" / "up").symlink_to(root)  # a link back to a folder above: not walked again
    first = write_listing(root, iter_image_files(root), tmp_path / "a.tsv", ["0", "1"])
    assert first["count"] == 6 and first["labelled"]
    (root / "0" / "0.png").unlink()
    Image.new("L", (8, 8), 7).save(root / "1" / "7.png")
    os.utime(root / "1" / "1.png", ns=(1, 1))
    second = write_listing(root, iter_image_files(root), tmp_path / "b.tsv", ["0", "1"])
    assert second["count"] == 6 and second["sha256"] != first["sha256"]
    assert describe_listing_change(tmp_path / "a.tsv", tmp_path / "b.tsv") == \
        "1 images added, 1 removed, 1 modified (e.g. 0/0.png)"
    assert not write_listing(root, iter_image_files(root), tmp_path / "c.tsv", ["x"])["labelled"]

    names = [str(p.relative_to(root)) for p in iter_image_files(root)]
    for name, order in (("a.txt", names), ("b.txt", names[::-1] + names[:1])):  # a list's own order
        (root / name).write_text("\n".join(order) + "\n")
        write_listing(root / name, iter_image_files(root / name), tmp_path / f"{name}.tsv", [])
    assert describe_listing_change(tmp_path / "a.txt.tsv", tmp_path / "b.txt.tsv") == \
        "the image list changed (7 images, was 6)"
    odd = root / "1" / "tab\tnew\nline\udcff.png"  # names that would break a plain line
    Image.new("L", (8, 8), 9).save(os.fsencode(odd))
    write_listing(root, iter_image_files(root), tmp_path / "d.tsv", ["0", "1"])
    assert odd in list(read_listing(root, tmp_path / "d.tsv"))


def test_an_image_whose_name_is_not_utf8_is_predicted_in_every_format(digits_run, tmp_path):
    import os

    root = _image_folder(tmp_path / "imgs", n=2)
    Image.new("L", (8, 8), 9).save(os.fsencode(root / "1" / "tab\tnew\nline\udcff.png"))
    for fmt in ("csv", "jsonl", "parquet"):
        proc = run_cli("predict", "--model", str(digits_run / "model.onnx"), "--input",
                       str(root), "--output", str(tmp_path / f"p.{fmt}"), "--no-progress")
        assert proc.returncode == 0, proc.stderr[-2000:]
    ids = [json.loads(line)["id"] for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert "1/tab\tnew\nline\\xff.png" in ids and len(ids) == 3
