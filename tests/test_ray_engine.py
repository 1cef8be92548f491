"""`trainer predict --engine ray` on a real local Ray instance (2 CPUs and one declared GPU,
started once for the module with `ray start --head`; one test starts its own): the same rows
as the local engine for an image folder, a multi-file Parquet table and .npy shards; the
same drift report; a killed worker; a killed driver and --resume; a model replaced between
two jobs of one driver; GPU workers refused in one line; the extra missing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import assert_one_line_error, poisoned_env, run_cli

pytest.importorskip("ray", reason="the ray extra is not installed (pip install '.[ray]')")
RAY = Path(sys.executable).parent / "ray"
# The test cluster runs on loopback without Ray's token authentication, which Ray 2.60 turns
# on by default for new clusters (a joining driver must then hold the same token).
CLUSTER_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    port = 20000 + os.getpid() % 20000
    temp = tmp_path_factory.mktemp("ray")
    env = {**os.environ, **CLUSTER_ENV}
    # One GPU declared (this machine has none): enough to schedule the GPU-worker actors,
    # whose CUDA session then fails in one line.
    subprocess.run([str(RAY), "start", "--head", "--num-cpus", "2", "--num-gpus", "1",
                    "--port", str(port),
                    "--include-dashboard", "false", "--temp-dir", str(temp),
                    "--disable-usage-stats"], check=True, capture_output=True, env=env,
                   timeout=180)
    yield f"127.0.0.1:{port}"
    subprocess.run([str(RAY), "stop", "--force"], capture_output=True, check=False, timeout=120,
                   env=env)


def predict(*args: str, address: str | None = None, cwd=None):
    extra = ("--engine", "ray", "--address", address) if address else ()
    return run_cli("predict", *args, *extra, "--no-progress", cwd=cwd, env=CLUSTER_ENV,
                   timeout=600)


def _rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def _same_rows(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(sorted(got, key=lambda r: r["id"]), sorted(want, key=lambda r: r["id"])):
        assert g.keys() == w.keys()
        for k in g:
            if isinstance(g[k], float):
                assert abs(g[k] - w[k]) <= 1e-6, (k, g, w)
            else:
                assert g[k] == w[k], (k, g, w)


@pytest.fixture(scope="module")
def digits_images(digits_test_npz, tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("images") / "test"
    with np.load(digits_test_npz) as npz:
        x, y, names = npz["x"], npz["y"], npz["class_names"]
    for i, (img, label) in enumerate(zip(x, y)):
        folder = root / str(names[label])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0]).save(folder / f"{i:04d}.png")
    return root


@pytest.mark.slow  # Ray's start-up: CI runs these (./scripts/test.sh --slow)
def test_image_folder_rows_and_drift_equal_the_local_engine(cluster, digits_run, digits_images,
                                                             tmp_path):
    model = str(digits_run / "model.onnx")
    local = tmp_path / "local.parquet"
    assert predict("--model", model, "--input", str(digits_images), "--output", str(local),
                   "--top-k", "2").returncode == 0
    proc = predict("--model", model, "--input", str(digits_images), "--output",
                   str(tmp_path / "ray"), "--top-k", "2", "--block-images", "100",
                   address=cluster)
    assert proc.returncode == 0, proc.stderr
    parts = sorted((tmp_path / "ray").glob("images-*.parquet"))
    assert len(parts) == 3  # 269 images in blocks of 100
    _same_rows([r for p in parts for r in _rows(p)], _rows(local))
    assert json.loads((tmp_path / "ray" / "drift.json").read_text()) == \
        json.loads((tmp_path / "local.drift.json").read_text())
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    local_summary = json.loads((tmp_path / "local.summary.json").read_text())
    assert summary["rows"] == 269 and summary["accuracy"] == local_summary["accuracy"]
    assert summary["engine"] == "ray" and summary["units"] == 3
    assert not (tmp_path / "ray" / ".ray-listings").exists()  # the block listings are gone


def test_an_image_folders_units_name_block_listings_not_images(digits_images, tmp_path):
    """The driver streams the folder into one listing per block; a unit carries the
    listing's path, count and SHA-256, so the driver holds nothing per image."""
    from export.errors import InputError
    from export.jobstate import read_listing
    from export.ray_engine import list_units
    from export.readers import image_files

    units = list_units(str(digits_images), 100, tmp_path / "listings")
    assert [u["output"] for u in units] == [f"images-0000{k}.parquet" for k in range(3)]
    assert [u["identity"]["images"]["count"] for u in units] == [100, 100, 69]
    assert all(set(u["identity"]["images"]) == {"count", "sha256"} for u in units)
    listed = [f for u in units for f in read_listing(digits_images, Path(u["listing"]))]
    assert listed == image_files(digits_images)  # every image once, in path order
    again = list_units(str(digits_images), 100, tmp_path / "listings")
    assert [u["identity"] for u in again] == [u["identity"] for u in units]
    (digits_images / "0").rename(digits_images / "0_moved")  # other names: other identities
    try:
        moved = list_units(str(digits_images), 100, tmp_path / "listings")
        assert moved[0]["identity"]["images"]["sha256"] != units[0]["identity"]["images"]["sha256"]
    finally:
        (digits_images / "0_moved").rename(digits_images / "0")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="empty: no PNG or JPEG images found"):
        list_units(str(empty), 100, tmp_path / "listings2")


@pytest.fixture(scope="module")
def table_model(tmp_path_factory):
    from tests.test_batch_tables import _table_model

    return _table_model(tmp_path_factory.mktemp("table_model"))


def _tables(folder: Path, files: int, rows: int, seed: int = 0) -> list[Path]:
    from tests.test_batch_tables import _table

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(files):
        path = folder / ("sub" if i % 2 else "") / f"part-{i}.parquet"
        path.parent.mkdir(exist_ok=True)
        pq.write_table(_table(rows, seed + i), path)
        paths.append(path)
    return paths


@pytest.mark.slow  # Ray's start-up: CI runs these (./scripts/test.sh --slow)
def test_multi_file_parquet_and_npy_shards_equal_the_local_engine(cluster, table_model,
                                                                  digits_run, digits_test_npz,
                                                                  tmp_path):
    files = _tables(tmp_path / "tables", 3, 500)
    proc = predict("--model", str(table_model), "--input", str(tmp_path / "tables"),
                   "--output", str(tmp_path / "ray_tables"), address=cluster)
    assert proc.returncode == 0, proc.stderr
    for f in files:
        local = tmp_path / f"local-{f.stem}.parquet"
        assert predict("--model", str(table_model), "--input", str(f), "--output",
                       str(local)).returncode == 0
        name = str(f.relative_to(tmp_path / "tables").with_suffix("")).replace(os.sep, "__")
        _same_rows(_rows(tmp_path / "ray_tables" / f"{name}.parquet"), _rows(local))

    shards = tmp_path / "shards"
    shards.mkdir()
    with np.load(digits_test_npz) as npz:
        x = npz["x"]
    for i in range(2):
        np.save(shards / f"x{i}.npy", x[i * 130:(i + 1) * 130])
    proc = predict("--model", str(digits_run / "model.onnx"), "--input", str(shards / "*.npy"),
                   "--output", str(tmp_path / "ray_npy"), address=cluster)
    assert proc.returncode == 0, proc.stderr
    for i in range(2):
        local = tmp_path / f"local-x{i}.parquet"
        assert predict("--model", str(digits_run / "model.onnx"), "--input",
                       str(shards / f"x{i}.npy"), "--output", str(local)).returncode == 0
        _same_rows(_rows(tmp_path / "ray_npy" / f"x{i}.parquet"), _rows(local))


def _hive(folder: Path) -> list[Path]:
    """A hive-partitioned folder whose key `c` is the model's third feature (no file holds
    it) and `day` a string passed through; a `_temporary` file Spark leaves is not a table."""
    from tests.test_batch_tables import _table

    files = []
    for i, (day, c) in enumerate([("2026-01-01", 0), ("2026-01-01", 1), ("2026-01-02", -1)]):
        path = folder / f"day={day}" / f"c={c}" / "part-0.parquet"
        path.parent.mkdir(parents=True)
        pq.write_table(_table(300 + i, i).drop(["c"]), path)
        files.append(path)
    (folder / "_temporary").mkdir()
    (folder / "_temporary" / "part-9.parquet").write_bytes(b"half written")
    return files


def _same_as_local(out: Path, units: list[dict], local: Path, root: Path) -> None:
    """Each unit's rows are the local engine's rows of its file (ids: row numbers there)."""
    by_file: dict[str, list[dict]] = {}
    for row in _rows(local):
        name, _, number = row["id"].rpartition(":")
        by_file.setdefault(name, []).append({**row, "id": number})
    assert len(units) == len(by_file)
    for unit in units:
        _same_rows(_rows(out / unit["output"]),
                   by_file[str(Path(unit["input"]).relative_to(root))])


def _run_units(units: list[dict], model: Path, out: Path) -> None:
    """Each unit as a Ray worker runs it, in this process."""
    from export.ray_engine import run_unit
    from export.runtime import Predictor

    out.mkdir()
    predictor = Predictor(str(model))
    for unit in json.loads(json.dumps(units)):  # as they travel to the workers
        run_unit(predictor, unit, out, {"top_k": 1, "on_error": "fail", "coverage": None})


def test_a_hive_folders_units_read_their_partition_columns(table_model, tmp_path):
    """A unit is one file of the folder: it reads the partition keys from its path, typed as
    the whole folder types them, so a key that is a feature is one there too (it was
    "missing feature column 'c'") and its rows equal the local engine's."""
    from export.batch import JobOptions, run_batch
    from export.ray_engine import list_units
    from export.tableschema import FolderSchema

    folder = tmp_path / "events"
    files = _hive(folder)
    units = list_units(str(folder), 100, tmp_path / "listings")
    schemas = {FolderSchema.from_json(u["folder"]) for u in json.loads(json.dumps(units))}
    assert len(schemas) == 1 and schemas.pop().keys == ("day", "c")
    _run_units(units, table_model, tmp_path / "ray")
    run_batch(table_model, folder, tmp_path / "local.parquet", JobOptions(progress=False))
    _same_as_local(tmp_path / "ray", units, tmp_path / "local.parquet", folder)
    assert _rows(tmp_path / "ray" / units[2]["output"])[0]["day"] == "2026-01-02"
    # a key typed by all its values: one that is not an integer makes it a string everywhere
    schema = FolderSchema.of(folder, files, "parquet").dataset(files[0], "parquet").schema
    assert (str(schema.field("day").type), str(schema.field("c").type)) == ("string", "int32")
    files[2].parent.rename(files[2].parent.with_name("c=x"))
    files = sorted(folder.glob("day=*/c=*/*.parquet"))
    schema = FolderSchema.of(folder, files, "parquet").dataset(files[0], "parquet").schema
    assert str(schema.field("c").type) == "string"
    assert list_units(str(files[0]), 100, tmp_path / "l")[0]["folder"] is None  # one file


def test_a_units_file_is_read_and_checked_as_its_folder_reads_it(table_model, tmp_path):
    """A unit's file has the folder's columns and types: a CSV file whose column holds whole
    numbers is read as the first file's decimals (the same rows as the local engine), and a
    file with a column the first lacks is refused as the local engine refuses it (its output
    had a column the others lacked)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from export.batch import JobOptions, run_batch
    from export.errors import InputError
    from export.ray_engine import list_units
    from tests.test_batch_tables import _table

    folder = tmp_path / "csv"
    folder.mkdir()
    pacsv.write_csv(_table(40, 0), folder / "part-0.csv")
    whole = _table(40, 1)
    whole = whole.set_column(1, "a", pa.array(np.round(whole["a"].to_numpy() * 3)))
    pacsv.write_csv(whole, folder / "part-1.csv")
    assert "." not in (folder / "part-1.csv").read_text().splitlines()[1].split(",")[1]
    units = list_units(str(folder), 100, tmp_path / "l")
    _run_units(units, table_model, tmp_path / "ray")
    run_batch(table_model, folder, tmp_path / "local.parquet", JobOptions(progress=False))
    _same_as_local(tmp_path / "ray", units, tmp_path / "local.parquet", folder)

    tables = tmp_path / "parquet"
    files = _tables(tables, 3, 50)
    pq.write_table(_table(50, 7).append_column("extra", pa.array([1] * 50)), files[2])
    with pytest.raises(InputError, match=r"part-2.parquet: has column 'extra', which the "
                                         r"first file lacks"):
        _run_units(list_units(str(tables), 100, tmp_path / "l2"), table_model, tmp_path / "r2")


def test_a_folder_of_tables_is_listed_as_the_local_engine_lists_it(table_model, tmp_path):
    """The driver lists a folder or glob of tables as the local engine does: a stray file is
    refused (it was left out, while the local engine refused the folder), CSV beside Parquet
    is refused (each format was read as a table of its own, their outputs' columns could
    differ), and a CSV among an image folder's images does not turn it into one table (the
    images were left out); .npy shards are still one unit each."""
    import pyarrow.csv as pacsv

    from export.batch import JobOptions, run_batch
    from export.errors import InputError
    from export.ray_engine import list_units
    from tests.test_batch_tables import _table

    tables = tmp_path / "tables"
    _tables(tables, 2, 30)
    (tables / "README.md").write_text("notes")
    for engine in (lambda: list_units(str(tables), 100, tmp_path / "l"),
                   lambda: run_batch(table_model, tables, tmp_path / "p.parquet",
                                     JobOptions(progress=False))):
        with pytest.raises(InputError, match=r"README.md: "):
            engine()
    (tables / "README.md").unlink()
    pacsv.write_csv(_table(30, 9), tables / "part-9.csv")
    with pytest.raises(InputError, match=r"tables: mixes CSV and Parquet files"):
        list_units(str(tables), 100, tmp_path / "l")
    with pytest.raises(InputError, match=r"tables/\*: mixes CSV and Parquet files"):
        list_units(str(tables / "*"), 100, tmp_path / "l")
    (tables / "part-9.csv").unlink()
    assert len(list_units(str(tables / "**" / "*.parquet"), 100, tmp_path / "l")) == 2

    images = tmp_path / "images"
    (images / "cat").mkdir(parents=True)
    (images / "cat" / "a.png").write_bytes(b"\x89PNG")
    pacsv.write_csv(_table(5, 0), images / "labels.csv")
    units = list_units(str(images), 100, tmp_path / "l3")
    assert [u["identity"]["images"]["count"] for u in units] == [1]
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(2):
        np.save(shards / f"x{i}.npy", np.zeros((3, 4), np.float32))
    units = list_units(str(shards), 100, tmp_path / "l4")
    assert [(u["output"], u["folder"]) for u in units] == [("x0.parquet", None),
                                                            ("x1.parquet", None)]
    (shards / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=r"notes.txt: not an input file; --engine ray takes"):
        list_units(str(shards), 100, tmp_path / "l5")


@pytest.mark.slow
def test_a_bad_file_fails_the_job_in_one_line_and_leaves_no_folder(cluster, digits_run,
                                                                   digits_images, tmp_path):
    import shutil

    images = tmp_path / "images"
    shutil.copytree(digits_images, images)
    (images / "0" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    proc = predict("--model", str(digits_run / "model.onnx"), "--input", str(images),
                   "--output", str(out), address=cluster)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "broken.png" in last and "cannot decode image" in last, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_a_hive_folder_through_the_cluster_equals_the_local_engine(cluster, table_model,
                                                                  tmp_path):
    from export.ray_engine import list_units

    folder = tmp_path / "events"
    _hive(folder)
    proc = predict("--model", str(table_model), "--input", str(folder), "--output",
                   str(tmp_path / "ray"), address=cluster)
    assert proc.returncode == 0, proc.stderr
    assert predict("--model", str(table_model), "--input", str(folder), "--output",
                   str(tmp_path / "local.parquet")).returncode == 0
    _same_as_local(tmp_path / "ray", list_units(str(folder), 100, tmp_path / "l"),
                   tmp_path / "local.parquet", folder)


def _exactly_once(out: Path, files: list[Path], root: Path) -> None:
    for f in files:
        name = str(f.relative_to(root).with_suffix("")).replace(os.sep, "__")
        ids = [int(r) for r in pq.read_table(out / f"{name}.parquet", columns=["id"])["id"]
               .to_pylist()]
        assert sorted(ids) == list(range(pq.ParquetFile(f).metadata.num_rows)), f
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def _wait_for(predicate, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.slow
def test_a_killed_worker_is_retried_and_every_row_is_written_once(cluster, table_model,
                                                                   tmp_path):
    files = _tables(tmp_path / "big", 8, 150_000)
    out = tmp_path / "out"
    job = subprocess.Popen(
        [sys.executable, "-m", "trainer", "predict", "--engine", "ray", "--address", cluster,
         "--model", str(table_model), "--input", str(tmp_path / "big"), "--output", str(out),
         "--no-progress", "--chunk-rows", "20000"],
        env={**os.environ, **CLUSTER_ENV, **poisoned_env(tmp_path)}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: any(out.glob(".*.partial/part-*")))  # a worker is mid-unit
    # A worker process running a unit is titled after Ray Data's task.
    workers = subprocess.run(["pgrep", "-f", r"ray::MapBatches\(predict_units\)"],
                             capture_output=True, text=True, check=False).stdout.split()
    assert workers, "no Ray worker process found"
    os.kill(int(workers[0]), signal.SIGKILL)
    _, err = job.communicate(timeout=600)
    assert job.returncode == 0, err
    _exactly_once(out, files, tmp_path / "big")


@pytest.mark.slow
def test_a_killed_driver_resumes_without_losing_or_duplicating_rows(table_model, tmp_path):
    # No --address: the job starts its own local Ray instance, and dies with it.
    files = _tables(tmp_path / "big", 8, 100_000, seed=5)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "trainer", "predict", "--engine", "ray", "--model",
            str(table_model), "--input", str(tmp_path / "big"), "--output", str(out),
            "--no-progress"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    job = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    _wait_for(lambda: len(list(out.glob("*.manifest.json"))) >= 2, seconds=300)
    os.killpg(job.pid, signal.SIGKILL)  # the driver and the Ray instance it started
    job.wait()
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("*.manifest.json")}
    assert len(done) < len(files), "the job finished before it could be killed"
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert_one_line_error(proc, str(out), "--resume")
    proc = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    _exactly_once(out, files, tmp_path / "big")
    for name, mtime in done.items():  # finished units were not redone
        assert (out / name).stat().st_mtime_ns == mtime
    summary = json.loads((out / "summary.json").read_text())
    # Actors of the killed driver may finish a unit or two before Ray notices it died.
    assert len(done) <= summary["units_resumed"] < len(files)


def test_ray_is_an_extra_and_its_flags_need_it(digits_run, digits_test_npz, tmp_path):
    model = str(digits_run / "model.onnx")
    proc = run_cli("predict", "--engine", "ray", "--model", model, "--input",
                   str(digits_test_npz), "--output", str(tmp_path / "o"),
                   env=poisoned_env(tmp_path, ("ray",)))
    assert_one_line_error(proc, "ray extra", "pip install '.[ray]'")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    proc = run_cli("predict", "--workers", "2", "--model", model, "--input",
                   str(digits_test_npz), "--output", str(tmp_path / "p.csv"))
    assert_one_line_error(proc, "--engine ray")
    for flag, value in (("--gpus-per-worker", "nan"), ("--gpus-per-worker", "1.5"),
                        ("--workers", "0")):
        proc = run_cli("predict", "--engine", "ray", flag, value, "--model", model, "--input",
                       str(digits_test_npz), "--output", str(tmp_path / "q"))
        assert_one_line_error(proc, flag)
        assert not (tmp_path / "q").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    proc = run_cli("predict", "--engine", "ray", "--model", model, "--input",
                   str(digits_test_npz), "--output", str(tmp_path / "full"))
    assert_one_line_error(proc, "not empty", "--resume")
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep"


@pytest.mark.slow
def test_gpu_workers_are_refused_in_one_line_without_the_gpus(cluster, table_model, tmp_path):
    _tables(tmp_path / "tables", 2, 50)
    # More GPU per worker than the cluster has: refused before anything runs.
    out = tmp_path / "too_many"
    proc = predict("--model", str(table_model), "--input", str(tmp_path / "tables"),
                   "--output", str(out), "--gpus-per-worker", "2", address=cluster)
    assert_one_line_error(proc, "--gpus-per-worker 2", "has 1 GPUs")
    assert not out.exists()
    # The declared GPU schedules the actor pool of GPU workers; their CUDA session cannot
    # start on this machine, and the job says so in one line, leaving no folder behind.
    # Ray's core worker logs one line of its own when Ray Data creates an actor pool (the
    # constructor arguments are an object ref: ray-project/ray#53727); nothing else.
    out = tmp_path / "no_cuda"
    proc = predict("--model", str(table_model), "--input", str(tmp_path / "tables"),
                   "--output", str(out), "--gpus-per-worker", "0.5", address=cluster)
    assert proc.returncode == 2, proc.stderr
    *before, last = proc.stderr.strip().splitlines()
    assert "--provider cuda" in last and "onnxruntime offers only" in last, proc.stderr
    assert all("ray-project/ray/issues/53727" in line for line in before), proc.stderr
    assert not out.exists()


def _reweighted(model: Path, path: Path) -> Path:
    """`model` with its weights scaled: the same card and inputs, other answers."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(model))
    for init in proto.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(-3 * numpy_helper.to_array(init), init.name))
    onnx.save(proto, str(path))
    return path


@pytest.mark.slow
def test_a_worker_kept_from_the_last_job_loads_the_replaced_model(cluster, table_model,
                                                                  tmp_path, monkeypatch):
    """A driver's worker processes are reused from job to job with their model loaded; a
    model replaced at the same path between two jobs must be loaded again."""
    import shutil

    import ray

    from export.batch import JobOptions, run_batch
    from export.jobstate import sha256_file
    from export.ray_engine import RayOptions, run_ray

    files = _tables(tmp_path / "tables", 2, 300)
    model = tmp_path / "model.onnx"
    other = _reweighted(table_model, tmp_path / "other.onnx")
    for key, value in CLUSTER_ENV.items():
        monkeypatch.setenv(key, value)
    ray.init(address=cluster, log_to_driver=False)
    try:
        answers = {}
        out = tmp_path / "out"
        for name, source in (("first", table_model), ("second", other)):
            shutil.copyfile(source, model)  # the same path, another model
            run_ray(str(model), str(tmp_path / "tables"), str(out),
                    JobOptions(progress=False), RayOptions(workers=2))
            answers[name] = []
            for f in files:
                unit = str(f.relative_to(tmp_path / "tables").with_suffix(""))
                rows = _rows(out / (unit.replace(os.sep, "__") + ".parquet"))
                local = tmp_path / f"local-{name}-{f.stem}.parquet"
                run_batch(source, f, local, JobOptions(progress=False))
                _same_rows(rows, _rows(local))
                answers[name].append(rows)
            summary = json.loads((out / "summary.json").read_text())
            assert summary["model_sha256"] == sha256_file(source)
            shutil.rmtree(out)  # the second job: same model path, same options, same folder
        assert answers["first"] != answers["second"]  # the two models answer differently
    finally:
        ray.shutdown()


def test_a_unit_refuses_a_model_changed_since_the_job_started(table_model, tmp_path):
    from export.errors import InputError
    from export.ray_engine import PredictUnits

    with pytest.raises(InputError, match="the model file changed since the job started"):
        PredictUnits(str(table_model), "0" * 64, str(tmp_path), {}, "cpu", 1)


def test_an_address_nothing_answers_at_fails_at_once_and_leaves_nothing(table_model, tmp_path):
    import socket

    _tables(tmp_path / "tables", 1, 10)
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        started = time.monotonic()
        proc = predict("--model", str(table_model), "--input", str(tmp_path / "tables"),
                       "--output", str(tmp_path / "out"), address=address)
        assert_one_line_error(proc, f"--address {address}", "nothing answers")
        assert time.monotonic() - started < 60  # Ray alone retries for minutes
        assert not (tmp_path / "out").exists()


def test_resume_refuses_a_folder_that_reads_as_another_table_since(table_model, tmp_path):
    """A unit done before is skipped by --resume only where its folder still reads as the
    same table: a partition renamed (`run=2` -> `run=late`) turns the key `run`, passed
    through as int32 by the done units, into a string for the unit still to do, so the job's
    outputs would differ in type; it is refused in one line before any cluster starts (the
    done units' own files are unchanged, which is all --resume compared)."""
    from export.batch import JobOptions
    from export.errors import InputError
    from export.ray_engine import RayOptions, _complete, list_units, run_ray
    from export.runtime import Predictor
    from tests.test_batch_tables import _table

    folder, out = tmp_path / "runs", tmp_path / "out"
    for i in range(3):
        (folder / f"run={i}").mkdir(parents=True)
        pq.write_table(_table(50, i), folder / f"run={i}" / "part-0.parquet")
    _run_units(list_units(str(folder), 100, tmp_path / "l")[:2], table_model, out)
    assert str(pq.read_schema(out / "run=0__part-0.parquet").field("run").type) == "int64"
    manifests = {p: p.read_bytes() for p in out.iterdir()}
    (folder / "run=2").rename(folder / "run=late")
    with pytest.raises(InputError, match=r"run=0/part-0.parquet: cannot --resume: its folder "
                                         r"reads as another table since its output was "
                                         r"written \(column 'run' was int32, is now string\)"):
        run_ray(str(table_model), str(folder), str(out), JobOptions(resume=True, progress=False),
                RayOptions())
    assert {p: p.read_bytes() for p in out.iterdir()} == manifests  # nothing touched
    (folder / "run=late").rename(folder / "run=2")  # as it was: the two are done
    units, sha = list_units(str(folder), 100, tmp_path / "l"), Predictor(str(table_model)).sha256
    job = {"top_k": 1, "on_error": "fail", "coverage": None}
    assert [_complete(out, u, sha, job) for u in units] == [True, True, False]
    first, second = sorted(out.glob("*.manifest.json"))  # damaged by hand: done again
    first.write_text(json.dumps({**json.loads(first.read_text()), "folder": {"schema": "?"}}))
    second.write_text("[]")
    assert [_complete(out, u, sha, job) for u in units] == [False, False, False]
