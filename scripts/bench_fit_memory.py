"""What a streamed fit of a table holds per row: peak RSS at 1x and 4x the rows.

    .venv/bin/python scripts/bench_fit_memory.py [--rows 2000000] [--repeats 2]
        [--work /tmp/bench_fit_memory] [--baseline CHECKOUT]

Generates two 4-file Parquet tables (4 float32 features, an integer class of 10; --rows
and 4x --rows). Then, in a fresh process per measurement, a streamed fit's data side as
`trainer fit` builds it (its allocator tuning, `FixedDataModule(...,
memory_budget_gb=1e-9)`: its dataset, splits, statistics and every batch of one epoch's
order), then a pass over each split in chunks (as the gates and `trainer data` read them),
for three targets: the 10 classes, 2 classes (the class's parity), and regression
(feature f0 as the target). Prints the peak RSS above the process's base after its
imports (VmHWM less VmRSS) after each step, median (range) of --repeats (after a first
round that ingests each table into the row cache), and the bytes a row the 4x table adds.
With --baseline (another checkout of this project), the same measurement of that code in
the same invocation, alternating with this one (each code with caches of its own).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from machine import describe, spread

STEPS = ("dataset", "splits", "info", "epoch", "passes")
TARGETS = {"10 classes": ("label", "auto"), "2 classes": ("parity", "auto"),
           "regression": ("f0", "regression")}
MARK = ".bench_fit_memory"

CHILD = """
import json, sys
def rss(field):
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(field)) / 1024
import lightning, torch
from trainer.allocator import tune_cpu_allocator
from trainer.data.datamodule import FixedDataModule
tune_cpu_allocator()  # as `trainer fit` runs
base, out = rss('VmRSS'), {}
dm = FixedDataModule(source='tabular', root=sys.argv[1], cache_dir=sys.argv[2],
                     target=sys.argv[3], task=sys.argv[4], batch_size=256, memory_budget_gb=1e-9)
dm.dataset; out['dataset'] = rss('VmHWM') - base
dm.splits; out['splits'] = rss('VmHWM') - base
dm.info; out['info'] = rss('VmHWM') - base
for batch in dm.train_dataloader().batch_sampler.sampler.batches(256, True):
    pass
out['epoch'] = rss('VmHWM') - base
for part in ('train', 'val', 'test'):  # the chunked passes of the gates and `trainer data`
    for x, y in dm.splits[part].chunks():
        pass
out['passes'] = rss('VmHWM') - base
print(json.dumps(out))
"""


def make_table(folder: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    rng = np.random.default_rng(rows)
    for i in range(4):
        n = rows // 4 + (rows % 4 if i == 3 else 0)
        cols = {f"f{j}": rng.normal(size=n).astype(np.float32) for j in range(4)}
        label = rng.integers(0, 10, n)
        pq.write_table(pa.table({**cols, "label": label, "parity": label % 2}),
                       folder / f"part{i}.parquet")


def measure(checkout: Path, table: Path, cache: Path, target: str, task: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(table), str(cache), target, task],
                          check=False, capture_output=True, text=True, cwd=checkout,
                          env={**os.environ, "PYTHONPATH": str(checkout)})
    if proc.returncode:
        sys.exit(f"{checkout}: {proc.stderr.strip().splitlines()[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_fit_memory"))
    ap.add_argument("--baseline", type=Path, help="another checkout, measured alternately")
    args = ap.parse_args()
    if args.work.exists() and any(args.work.iterdir()) and not (args.work / MARK).is_file():
        ap.error(f"--work {args.work}: not empty and not made by this script; give a new folder")
    print(describe())
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    (args.work / MARK).touch()
    sizes = {"1x": args.rows, "4x": 4 * args.rows}
    for name, rows in sizes.items():
        make_table(args.work / name, rows)
    codes = {"this code": ROOT, **({"baseline": args.baseline} if args.baseline else {})}
    peaks: dict = {}
    for rep in range(args.repeats + 1):  # the first round ingests each table (not counted)
        for size in sizes:
            for what, (target, task) in TARGETS.items():
                for k, (code, checkout) in enumerate(codes.items()):  # a cache each: their
                    got = measure(checkout, args.work / size,  # formats may differ
                                  args.work / f"cache-{size}-{k}", target, task)
                    for step in STEPS if rep else ():
                        peaks.setdefault((code, what, size, step), []).append(got[step])
    for code in codes:
        for what in TARGETS:
            steps = "; ".join(f"{step} {spread(peaks[code, what, '1x', step])} vs "
                              f"{spread(peaks[code, what, '4x', step])}" for step in STEPS)
            grow = (np.median(peaks[code, what, "4x", STEPS[-1]]) -  # the whole peak
                    np.median(peaks[code, what, "1x", STEPS[-1]])) * 2**20 / (3 * args.rows)
            print(f"{code}, {what}, {args.rows:,} vs {4 * args.rows:,} rows, peak MB above "
                  f"base after each step: {steps}; the 4x table adds {grow:.1f} bytes a row")


if __name__ == "__main__":
    main()
