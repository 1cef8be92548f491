"""Batch inference past one process, in one invocation: rows/s of the local engine
(`trainer predict`, one onnxruntime thread and all threads) against `--engine ray` with 1 and
2 workers (one thread each) on the same 200,000-row table, the local engine on the folder
of files Ray reads (as one table) against it on one file, Ray's start-up on its own, and
the machine's own ceiling: the same files through the local engine in 1 and 2 plain
processes (no Ray), so the Ray ratio can be read against what the cores allow.

    .venv/bin/python scripts/bench_ray.py [--rows 200000] [--files 8] [--repeats 7]
                                          [--commands 3]

The table (3 float features) is written once as one Parquet file for the local engine and
as --files Parquet files for Ray (a Ray job spreads over files); a small tabular MLP is
trained on it first with `trainer fit --config configs/tabular.yaml`. Ray runs in this
process's local instance (all cores): `ray.init` and a first tiny job (which starts the
driver's worker processes) are timed on their own; the measured jobs then run with Ray up,
as a driver's later jobs do. Last, each whole command is timed as a user runs it: a new
process, which starts (and stops) its own Ray instance.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import describe, ratio_of_medians, spread

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _table(n: int, seed: int):
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    label = np.where(x[:, 0] + 0.5 * x[:, 1] > 0, "up", "down")
    return pa.table({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "label": label})


def _model(work: Path) -> Path:
    import pyarrow.csv as pacsv

    pacsv.write_csv(_table(5000, 0), work / "train.csv")
    subprocess.run([sys.executable, "-m", "trainer", "fit", "--config",
                    str(ROOT / "configs" / "tabular.yaml"), "--data.root", "train.csv",
                    "--data.target", "label", "--trainer.max_epochs", "3",
                    "--trainer.enable_progress_bar", "false", "--report.plots", "false"],
                   cwd=work, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return next((work / "runs").glob("*/version_*/model.onnx"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--commands", type=int, default=3,
                   help="also time each whole command this many times (0: skip)")
    args = p.parse_args()
    print(describe())
    import pyarrow.parquet as pq
    import ray

    from export.batch import JobOptions, run_batch
    from export.ray_engine import RayOptions, run_ray

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = _model(work)
        table = _table(args.rows, 1)
        pq.write_table(table, work / "one.parquet")
        (work / "many").mkdir()
        step = -(-args.rows // args.files)
        for i in range(args.files):
            pq.write_table(table.slice(i * step, step), work / "many" / f"part-{i:03d}.parquet")

        def local(threads: int, source: str = "one.parquet") -> float:
            out = work / "local.parquet"
            t = time.perf_counter()
            run_batch(model, work / source, out, JobOptions(progress=False, threads=threads))
            elapsed = time.perf_counter() - t
            out.unlink()
            return args.rows / elapsed

        t = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 logging_level="WARNING")
        startup = time.perf_counter() - t

        def on_ray(workers: int) -> float:
            out = work / "ray_out"
            t = time.perf_counter()
            run_ray(str(model), str(work / "many"), str(out), JobOptions(progress=False),
                    RayOptions(workers=workers))
            elapsed = time.perf_counter() - t
            shutil.rmtree(out)
            return args.rows / elapsed

        (work / "tiny").mkdir()  # the driver's first job starts its worker processes
        for i in range(2):
            pq.write_table(table.slice(i * 100, 100), work / "tiny" / f"part-{i}.parquet")
        t = time.perf_counter()
        run_ray(str(model), str(work / "tiny"), str(work / "tiny_out"),
                JobOptions(progress=False), RayOptions(workers=2))
        first = time.perf_counter() - t
        print(f"Ray start-up (local instance, {os.cpu_count()} CPUs): ray.init {startup:.2f} s; "
              f"then the first job (2 units of 100 rows), which starts the worker processes, "
              f"{first:.2f} s")
        files = sorted((work / "many").glob("*.parquet"))
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(1) as one, ctx.Pool(2) as two:
            def plain(pool) -> float:
                t = time.perf_counter()
                pool.map(_plain_unit, [(str(model), str(f)) for f in files], chunksize=1)
                return args.rows / (time.perf_counter() - t)

            local(1), on_ray(1), plain(one), plain(two)  # warm-up: page cache, code paths
            results = {"local, 1 thread": [], "local, all threads": [],
                       "local, 1 thread, folder": [], "ray, 1 worker": [],
                       "ray, 2 workers": [], "plain, 1 process": [], "plain, 2 processes": []}
            for _ in range(args.repeats):  # interleaved: drift in the machine hits all sides
                results["local, 1 thread"].append(local(1))
                results["local, all threads"].append(local(0))
                results["local, 1 thread, folder"].append(local(1, "many"))
                results["ray, 1 worker"].append(on_ray(1))
                results["ray, 2 workers"].append(on_ray(2))
                results["plain, 1 process"].append(plain(one))
                results["plain, 2 processes"].append(plain(two))
        for name, rates in results.items():
            print(f"{name:24} {spread(rates, '{:,.0f}')} rows/s")
        two_vs_one = ratio_of_medians(results["ray, 2 workers"], results["ray, 1 worker"])
        ceiling = ratio_of_medians(results["plain, 2 processes"], results["plain, 1 process"])
        overhead = 1 - ratio_of_medians(results["ray, 1 worker"], results["local, 1 thread"])
        print(f"ray 2 workers / 1 worker: {two_vs_one:.2f}x (goal >= 1.6x); the same files in "
              f"2 plain processes / 1, no Ray: {ceiling:.2f}x")
        folder = ratio_of_medians(results["local, 1 thread, folder"], results["local, 1 thread"])
        print(f"the local engine on the {args.files}-file folder (read as one table) / on one "
              f"file, 1 thread: {folder:.2f}x")
        print(f"ray overhead vs the local engine at equal parallelism (1 worker vs 1 thread): "
              f"{overhead:.1%} (goal < 25%)")
        ray.shutdown()
        if args.commands:  # what a user of the command waits: a new process every job
            command = [sys.executable, "-m", "trainer", "predict", "--model", str(model),
                       "--no-progress"]
            runs = {"trainer predict (local engine)": ["--input", str(work / "one.parquet"),
                                                       "--output", str(work / "c.parquet")],
                    "trainer predict --engine ray": ["--engine", "ray", "--input",
                                                     str(work / "many"), "--output",
                                                     str(work / "c_ray")]}
            seconds = {name: [] for name in runs}
            for _ in range(args.commands):
                for name, extra in runs.items():
                    t = time.perf_counter()
                    subprocess.run([*command, *extra], check=True, capture_output=True)
                    seconds[name].append(time.perf_counter() - t)
                    for path in work.glob("c*"):
                        shutil.rmtree(path) if path.is_dir() else path.unlink()
            for name, values in seconds.items():
                print(f"{name:32} {spread(values, '{:.2f}')} s, the whole command "
                      "(Ray's own instance started and stopped by it)")


_PLAIN: dict = {}


def _plain_unit(job: tuple[str, str]) -> None:
    """One file through the local engine in a plain process (kept Predictor, one thread):
    the work a Ray unit does, without Ray."""
    from export.batch import JobOptions, run_batch
    from export.runtime import Predictor

    model, path = job
    if model not in _PLAIN:
        _PLAIN[model] = Predictor(model, "cpu", 1)
    out = Path(tempfile.mkdtemp()) / "part.parquet"
    run_batch(model, path, out, JobOptions(progress=False, threads=1),
              predictor=_PLAIN[model], reports=False)
    shutil.rmtree(out.parent)


if __name__ == "__main__":
    main()
