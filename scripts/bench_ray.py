"""Batch inference past one process, in one invocation: rows/s of the local engine
(`trainer predict`, one onnxruntime thread and all threads) against `--engine ray` with 1 and
2 workers (one thread each) on the same 200,000-row table, and Ray's start-up on its own.

    .venv/bin/python scripts/bench_ray.py [--rows 200000] [--files 8] [--repeats 3]

The table (3 float features) is written once as one Parquet file for the local engine and
as --files Parquet files for Ray (a Ray job spreads over files); a small tabular MLP is
trained on it first with `trainer fit --config configs/tabular.yaml`. Ray runs in this
process's local instance (all cores), started once and timed on its own.
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--repeats", type=int, default=3)
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

        def local(threads: int) -> float:
            out = work / "local.parquet"
            t = time.perf_counter()
            run_batch(model, work / "one.parquet", out,
                      JobOptions(progress=False, threads=threads))
            elapsed = time.perf_counter() - t
            out.unlink()
            return args.rows / elapsed

        t = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 logging_level="WARNING")
        startup = time.perf_counter() - t
        print(f"Ray start-up (ray.init, local instance, {os.cpu_count()} CPUs): {startup:.2f} s")

        def on_ray(workers: int) -> float:
            out = work / "ray_out"
            t = time.perf_counter()
            run_ray(str(model), str(work / "many"), str(out), JobOptions(progress=False),
                    RayOptions(workers=workers))
            elapsed = time.perf_counter() - t
            shutil.rmtree(out)
            return args.rows / elapsed

        results = {"local, 1 thread": [], "local, all threads": [], "ray, 1 worker": [],
                   "ray, 2 workers": []}
        local(1), on_ray(1)  # warm-up: page cache, actor code paths
        for _ in range(args.repeats):  # interleaved, so drift in the machine hits all sides
            results["local, 1 thread"].append(local(1))
            results["local, all threads"].append(local(0))
            results["ray, 1 worker"].append(on_ray(1))
            results["ray, 2 workers"].append(on_ray(2))
        for name, rates in results.items():
            print(f"{name:20} {spread(rates, '{:,.0f}')} rows/s")
        two_vs_one = ratio_of_medians(results["ray, 2 workers"], results["ray, 1 worker"])
        overhead = 1 - ratio_of_medians(results["ray, 1 worker"], results["local, 1 thread"])
        print(f"ray 2 workers / 1 worker: {two_vs_one:.2f}x (goal >= 1.6x)")
        print(f"ray overhead vs the local engine at equal parallelism (1 worker vs 1 thread): "
              f"{overhead:.1%} (goal < 25%)")
        ray.shutdown()


if __name__ == "__main__":
    main()
