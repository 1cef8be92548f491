"""Inference speed on CPU, in one invocation:
1. the onnxruntime Predictor (fp32 and INT8) against torch eager inference of the same
   checkpoint, same batch size, same thread count;
2. the whole `trainer predict` job over the 10,000 real MNIST test images: images per
   second and peak memory of the process.

    .venv/bin/python scripts/bench_infer.py [--ckpt CKPT] [--threads N] [--batch-size 256]

Without --ckpt it trains the speedrun recipe (as bench_export.py does); INT8 keeps its
accuracy gate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_export import ROOT, recipe_checkpoint
from machine import describe, ratio_of_medians, spread
from export.readers import read_idx
from export.runtime import Predictor
from trainer.freeze import Frozen, export_checkpoint, held_out_from_checkpoint, module_from_checkpoint
from trainer.runs import load_checkpoint

MNIST = ROOT.parent / "shared" / "data" / "mnist"


def throughput(run, x: np.ndarray, batch_size: int, passes: int = 5) -> list[float]:
    """Images per second of `run(batch)` for each of `passes` sweeps of `x`, after one
    warm-up batch; both sides are swept over the same batches."""
    run(x[:batch_size])
    rates = []
    for _ in range(passes):
        start = time.perf_counter()
        for i in range(0, len(x), batch_size):
            run(x[i:i + batch_size])
        rates.append(len(x) / (time.perf_counter() - start))
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", help="checkpoint (default: a quick MNIST convnet)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args()
    print(describe())
    torch.set_num_threads(args.threads)
    x = np.ascontiguousarray(read_idx(MNIST / "t10k-images-idx3-ubyte.gz")[:, None])

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = Path(args.ckpt) if args.ckpt else recipe_checkpoint(tmp)
        data = held_out_from_checkpoint(load_checkpoint(ckpt))
        export_checkpoint(ckpt, tmp / "fp32.onnx", data=data)
        export_checkpoint(ckpt, tmp / "int8.onnx", data=data, quantize="int8")
        frozen = Frozen(module_from_checkpoint(load_checkpoint(ckpt))).eval()

        def eager(batch):
            with torch.inference_mode():
                return frozen(torch.from_numpy(batch))

        rates = {"torch eager": throughput(eager, x, args.batch_size)}
        for variant in ("fp32", "int8"):
            predictor = Predictor(tmp / f"{variant}.onnx", provider="cpu", threads=args.threads)
            rates[f"onnxruntime {variant}"] = throughput(
                lambda b, p=predictor: p.predict(b, batch_size=args.batch_size), x, args.batch_size)

        out = tmp / "preds.csv"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "trainer", "predict", "--model",
                        str(tmp / "fp32.onnx"), "--input", str(MNIST / "t10k-images-idx3-ubyte.gz"),
                        "--output", str(out), "--no-progress"], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        summary = json.loads((tmp / "preds.summary.json").read_text())

    print(f"MNIST test images {len(x)}, batch {args.batch_size}, {args.threads} threads, CPU; "
          f"images/s per sweep of the 10,000 images:")
    base = rates["torch eager"]
    for name, values in rates.items():
        print(f"  {name:18} {spread(values, '{:,.0f}')}  ratio of medians "
              f"{ratio_of_medians(values, base):.2f}x torch eager")
    print(f"trainer predict, 10,000 MNIST test images (fp32): {summary['rows_per_second']:,.0f} "
          f"images/s inside the job, {wall:.2f} s for the whole process, peak memory "
          f"{summary['peak_memory_mb']:.0f} MB, accuracy {summary['accuracy']:.4f}")


if __name__ == "__main__":
    main()
