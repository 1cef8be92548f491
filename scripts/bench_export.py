"""Model size and onnxruntime CPU latency/throughput of the fp32 and INT8 exports of the same
checkpoint, in one invocation.

    .venv/bin/python scripts/bench_export.py [--ckpt CKPT] [--threads N]

Without --ckpt it trains the MNIST convnet of configs/mnist.yaml briefly on the real MNIST
(../shared/data/mnist) and exports that. Latency: median of single-image runs; throughput:
images per second at batch 256.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from export.to_onnx import export_checkpoint, held_out_from_checkpoint
from trainer.runs import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def quick_mnist_checkpoint(out: Path) -> Path:
    import lightning as L

    from trainer.data.datamodule import FixedDataModule
    from trainer.module import ClassifierModule

    dm = FixedDataModule(source="mnist", root=str(ROOT.parent / "shared" / "data" / "mnist"),
                         batch_size=256, val_fraction=0.1)
    model = ClassifierModule(arch="convnet", width=32, lr=4e-3, data_info=dm.info)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=150, limit_val_batches=4,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(model, dm)
    trainer.save_checkpoint(out)
    # Lightning's fit saves the DataModule's hyperparameters; export rebuilds its splits.
    return out


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
        single.append(time.perf_counter() - t)
    batch = x[:256]
    session.run(["logits"], {name: batch})
    t, runs = time.perf_counter(), 20
    for _ in range(runs):
        session.run(["logits"], {name: batch})
    return {"size_kb": path.stat().st_size / 1024,
            "latency_ms": statistics.median(single) * 1e3,
            "throughput": runs * len(batch) / (time.perf_counter() - t)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", help="checkpoint to export (default: a quick MNIST convnet)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = Path(args.ckpt) if args.ckpt else quick_mnist_checkpoint(tmp / "mnist.ckpt")
        data = held_out_from_checkpoint(load_checkpoint(ckpt))
        cards = {}
        for variant, kwargs in (("fp32", {}), ("int8", {"quantize": "int8",
                                                        "max_accuracy_drop": 100.0})):
            cards[variant] = export_checkpoint(ckpt, tmp / f"{variant}.onnx", data=data, **kwargs)
        results = {v: measure(tmp / f"{v}.onnx", data.val_x, args.threads) for v in cards}
    q = cards["int8"]["quantization"]
    print(f"checkpoint {ckpt.name}: input {cards['fp32']['input']['shape']}, onnxruntime "
          f"{ort.__version__}, {args.threads} threads, CPU")
    print(f"{'variant':8} {'size KiB':>9} {'latency ms (b=1)':>17} {'images/s (b=256)':>17} "
          f"{'val acc':>8}")
    for v, r in results.items():
        acc = q["val_accuracy_fp32"] if v == "fp32" else q["val_accuracy_int8"]
        print(f"{v:8} {r['size_kb']:9.1f} {r['latency_ms']:17.3f} {r['throughput']:17,.0f} "
              f"{acc:8.4f}")
    f, i = results["fp32"], results["int8"]
    print(f"int8 vs fp32: size {i['size_kb'] / f['size_kb']:.2f}x, latency "
          f"{f['latency_ms'] / i['latency_ms']:.2f}x faster, throughput "
          f"{i['throughput'] / f['throughput']:.2f}x, accuracy drop {q['drop_points']:.2f} points")


if __name__ == "__main__":
    main()
