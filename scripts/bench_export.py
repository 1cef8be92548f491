"""Model size and onnxruntime CPU latency/throughput of the fp32 and INT8 exports of the same
checkpoint, in one invocation.

    .venv/bin/python scripts/bench_export.py [--ckpt CKPT] [--threads N]

Without --ckpt it trains the recipe configs/mnist_speedrun.yaml on the real MNIST
(../shared/data/mnist) to the accuracy the recipe reaches (about 99%) and exports that; the
INT8 export keeps its accuracy gate (refused if it loses more than 0.5 points). Latency:
300 single-image runs; throughput: 5 runs of 20 batches of 256 images; each printed as
median (range).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from trainer.freeze import export_checkpoint, held_out_from_checkpoint
from trainer.runs import load_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, ratio_of_medians, spread  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def recipe_checkpoint(work: Path) -> Path:
    """Train configs/mnist_speedrun.yaml (about 99% test accuracy) and return its best
    checkpoint."""
    subprocess.run([sys.executable, "-m", "trainer", "fit", "--config",
                    str(ROOT / "configs" / "mnist_speedrun.yaml"), "--data.root",
                    str(ROOT.parent / "shared" / "data" / "mnist"), "--export.enabled", "false",
                    "--report.plots", "false", "--trainer.logger.init_args.save_dir",
                    str(work / "runs"), "--trainer.enable_progress_bar", "false"],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return next((work / "runs").glob("*/version_*/checkpoints/best-*.ckpt"))


def measure(path: Path, x: np.ndarray, threads: int) -> dict:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for _ in range(20):
        session.run(["logits"], {name: x[:1]})
    single = []
    for i in range(300):
        t = time.perf_counter()
        session.run(["logits"], {name: x[i % len(x):i % len(x) + 1]})
        single.append((time.perf_counter() - t) * 1e3)
    batch, throughput = x[:256], []
    session.run(["logits"], {name: batch})
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(20):
            session.run(["logits"], {name: batch})
        throughput.append(20 * len(batch) / (time.perf_counter() - t))
    return {"size_kb": path.stat().st_size / 1024, "latency_ms": single,
            "throughput": throughput}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", help="checkpoint to export (default: train the speedrun recipe)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    print(describe())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = Path(args.ckpt) if args.ckpt else recipe_checkpoint(tmp)
        data = held_out_from_checkpoint(load_checkpoint(ckpt))
        cards = {"fp32": export_checkpoint(ckpt, tmp / "fp32.onnx", data=data),
                 "int8": export_checkpoint(ckpt, tmp / "int8.onnx", data=data, quantize="int8")}
        results = {v: measure(tmp / f"{v}.onnx", data.val_x, args.threads) for v in cards}
    q = cards["int8"]["quantization"]
    print(f"checkpoint {ckpt.name}: input {cards['fp32']['input']['shape']}, {args.threads} "
          f"threads, CPU; validation accuracy fp32 {q['val_accuracy_fp32']:.4f}, int8 "
          f"{q['val_accuracy_int8']:.4f} ({q['drop_points']:+.2f} points, gate "
          f"{q['max_drop_points']:g})")
    for v, r in results.items():
        print(f"  {v}: {r['size_kb']:.1f} KiB; latency ms (batch 1) {spread(r['latency_ms'], '{:.3f}')}; "
              f"images/s (batch 256) {spread(r['throughput'], '{:,.0f}')}")
    f, i = results["fp32"], results["int8"]
    print(f"int8 / fp32 (ratios of medians): size {i['size_kb'] / f['size_kb']:.2f}x, latency "
          f"{ratio_of_medians(i['latency_ms'], f['latency_ms']):.2f}x, throughput "
          f"{ratio_of_medians(i['throughput'], f['throughput']):.2f}x")


if __name__ == "__main__":
    main()
