"""LitData (Lightning's `litdata.optimize` + `StreamingDataset`) against this project's
streaming path, on the same rows: the evaluation issue #23 asks for.

    .venv/bin/python scripts/bench_litdata.py [--images 80000] [--size 32] [--repeats 3]
                                              [--work /tmp/bench_litdata]

LitData is not a dependency of the project: install it beside the venv first
(`pip install litdata`). In one invocation, on generated random RGB PNGs in 10 class
folders, ingested once into the row cache, median (range) of --repeats:
- conversion: `litdata.optimize` of the cached rows (already decoded) into LitData's chunk
  files, in s, and the disk both take;
- the training loader alone, one shuffled epoch, batch 256 (batches/s): this project's
  streaming loader and LitData's `StreamingDataLoader`, each with 0 and 2 workers;
- resume: each loader's state taken a third into an epoch and a new loader restored from
  it: are the epoch's remaining batches bitwise those of the loader that went on?
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_scale import make_images, quiet
from machine import describe, ratio_of_medians, spread

BATCH = 256


def disk_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


# ------------------------------------------------------------------ this project's loader
def ours(root: Path, cache: Path, workers: int):
    from trainer.data.datamodule import FixedDataModule

    dm = FixedDataModule(source="image_folder", root=str(root), cache_dir=str(cache),
                         batch_size=BATCH, memory_budget_gb=1e-9, num_workers=workers, seed=7)
    with quiet():
        dm.setup("fit")
    return dm


def ours_batches(dm, skip: int = 0):
    loader = dm.train_dataloader()
    loader.batch_sampler.sampler.resume_skip = lambda: skip  # as a resumed fit sets it
    return loader


# ------------------------------------------------------------------ LitData
_ROWS = None  # the split the optimize workers read (forked: inherited, not pickled)


def _items(span):
    x, y = _ROWS.subset(np.arange(*span)).arrays()
    for i in range(len(y)):
        yield {"x": x[i], "y": int(y[i])}


def convert(dm, out: Path) -> float:
    import litdata

    global _ROWS
    _ROWS = dm.splits["train"]
    n = len(_ROWS)
    spans = [(a, min(n, a + 4096)) for a in range(0, n, 4096)]
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    with quiet():
        litdata.optimize(fn=_items, inputs=spans, output_dir=str(out), chunk_bytes="64MB",
                         num_workers=2, verbose=False, start_method="fork")
    return time.perf_counter() - t0


def theirs(out: Path, workers: int):
    from litdata import StreamingDataLoader, StreamingDataset

    ds = StreamingDataset(str(out), shuffle=True, seed=7)
    return StreamingDataLoader(ds, batch_size=BATCH, num_workers=workers)


def _x(batch):
    return batch["x"] if isinstance(batch, dict) else batch[0]


def rate(loader) -> float:
    t0, n = time.perf_counter(), 0
    for _ in loader:
        n += 1
    return n / (time.perf_counter() - t0)


def resumes_exactly(make, restore) -> str:
    """Whether a loader restored a third into an epoch gives the rest of it bitwise."""
    loader = make()
    it, seen = iter(loader), 0
    total = len(loader)
    for _ in range(total // 3):
        next(it)
        seen += 1
    state = loader.state_dict() if hasattr(loader, "state_dict") else None
    rest = [_x(b).clone() for b in it]
    again = restore(state, seen)
    got = [_x(b) for b in again]
    same = len(got) == len(rest) and all(torch.equal(a, b) for a, b in zip(got, rest))
    return (f"{'bitwise' if same else 'NOT the same'} ({len(got)} batches after restore, "
            f"{len(rest)} expected)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=80000)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default="/tmp/bench_litdata")
    args = ap.parse_args()
    try:
        import litdata
    except ImportError:
        sys.exit("bench_litdata: LitData is not installed; pip install litdata")
    print(describe() + f"; litdata {litdata.__version__}")
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    root, cache, out = work / "images", work / "cache", work / "litdata"
    make_images(root, args.images, args.size)
    dm = ours(root, cache, 0)
    rows = len(dm.splits["train"])
    took = [convert(dm, out) for _ in range(args.repeats)]
    print(f"{rows:,} training rows of RGB {args.size}x{args.size}: litdata.optimize of the cached "
          f"rows {spread(took, '{:.2f}')} s; disk: the row cache {disk_mib(cache):.1f} MiB (every "
          f"split), LitData's chunks {disk_mib(out):.1f} MiB more")

    rates = {}
    for w in (0, 2):
        mine = ours(root, cache, w)
        rates["ours", w] = [rate(ours_batches(mine)) for _ in range(args.repeats)]
        rates["litdata", w] = [rate(theirs(out, w)) for _ in range(args.repeats)]
    for w in (0, 2):
        print(f"training loader alone, {w} workers, batch {BATCH}, batches/s: this project's "
              f"streaming path {spread(rates['ours', w])}; LitData {spread(rates['litdata', w])}; "
              f"LitData / ours {ratio_of_medians(rates['litdata', w], rates['ours', w]):.2f}x")

    for w in (0, 2):
        mine = ours(root, cache, w)
        print(f"resume a third into an epoch, {w} workers: this project's path "
              + resumes_exactly(lambda m=mine: ours_batches(m),
                                lambda _, seen, w=w: ours_batches(ours(root, cache, w), seen)))

        def restored(state, _, w=w):
            loader = theirs(out, w)
            loader.load_state_dict(state)
            return loader
        print(f"resume a third into an epoch, {w} workers: LitData "
              + resumes_exactly(lambda w=w: theirs(out, w), restored))


if __name__ == "__main__":
    main()
