"""The offline update, measured: new images arrive; retrain from scratch or warm-start from
the previous model (`--model.init_from`), and count the epochs each needs.

    .venv/bin/python scripts/bench_update.py [--mnist ../shared/data/mnist] [--base 10000]
                                             [--new 2000] [--epochs 6] [--seeds 3]

An image folder of real MNIST digits with its own fixed val/ and test/ folders (so the
validation rows do not move when training files are added): the previous model trains
`--epochs` on `--base` training images; then `--new` images are added to train/ and
(a) a fresh fit and (b) a fit started from the previous model's best checkpoint each run
`--epochs` on the grown folder (same recipe, same seed). Reported per seed: the best
validation accuracy of (a), and the first epoch at which each run reaches it (within 0.1
points), i.e. the epochs the warm start saves; also each run's ingest line (what was
decoded).
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
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from machine import describe  # noqa: E402

from export.readers import read_idx  # noqa: E402


def write_pngs(folder: Path, x: np.ndarray, y: np.ndarray, first: int) -> None:
    for i, (img, label) in enumerate(zip(x, y)):
        path = folder / str(int(label)) / f"{first + i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path, compress_level=1)


def fit(work: Path, root: Path, epochs: int, seed: int, name: str, *extra: str) -> list[float]:
    cmd = [sys.executable, "-m", "trainer", "fit", "--config", str(ROOT / "configs" /
           "image_folder.yaml"), "--data.root", str(root), "--data.image_size", "[28, 28]",
           "--data.color_mode", "L", "--data.hflip", "false", "--data.crop_padding", "1",
           "--data.batch_size", "256", "--model.arch", "stridenet", "--model.width", "16",
           "--model.lr", "0.01", "--trainer.max_epochs", str(epochs), "--seed_everything",
           str(seed), "--trainer.precision", "32-true", "--model.channels_last", "false",
           "--trainer.enable_progress_bar", "false", "--export.enabled", "false",
           "--trainer.logger.init_args.name", name, *extra]
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    print("   ", next(line for line in proc.stderr.splitlines() if "images:" in line)
          .split(" (")[0])
    run = sorted((work / "runs" / name).glob("version_*"))[-1]
    history = json.loads((run / "metrics.json").read_text())["history"]
    return [float(e["val/acc"]) for e in history]


def first_epoch(accs: list[float], target: float) -> int | None:
    return next((i + 1 for i, a in enumerate(accs) if a >= target - 0.001), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mnist", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    ap.add_argument("--base", type=int, default=10000)
    ap.add_argument("--new", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--work", default="/tmp/bench_update")
    args = ap.parse_args()
    print(describe())
    mnist = Path(args.mnist)
    x = read_idx(mnist / "train-images-idx3-ubyte.gz")
    y = read_idx(mnist / "train-labels-idx1-ubyte.gz")
    tx = read_idx(mnist / "t10k-images-idx3-ubyte.gz")
    ty = read_idx(mnist / "t10k-labels-idx1-ubyte.gz")
    saved = []
    for seed in range(args.seeds):
        work = Path(args.work) / f"seed{seed}"
        shutil.rmtree(work, ignore_errors=True)
        root = work / "digits"
        order = np.random.default_rng(seed).permutation(len(x))
        base, new = order[:args.base], order[args.base:args.base + args.new]
        write_pngs(root / "train", x[base], y[base], 0)
        write_pngs(root / "val", tx[:2000], ty[:2000], 0)
        write_pngs(root / "test", tx[2000:4000], ty[2000:4000], 0)
        env_cache = work / "cache"
        os.environ["FROZENFIT_CACHE"] = str(env_cache)
        print(f"seed {seed}: previous model on {args.base:,} images")
        fit(work, root, args.epochs, seed, "previous")
        parent = next((work / "runs" / "previous").glob("version_*/checkpoints/best*.ckpt"))
        write_pngs(root / "train", x[new], y[new], args.base)
        print(f"  {args.new:,} images added; from scratch:")
        scratch = fit(work, root, args.epochs, seed, "scratch")
        print("  warm start (--model.init_from):")
        warm = fit(work, root, args.epochs, seed, "warm", "--model.init_from", str(parent))
        target = max(scratch)
        e_scratch, e_warm = first_epoch(scratch, target), first_epoch(warm, target)
        print(f"  val acc by epoch: scratch {[round(a, 4) for a in scratch]}, "
              f"warm {[round(a, 4) for a in warm]}")
        print(f"  scratch reaches its best {target:.4f} at epoch {e_scratch}; warm start at "
              f"epoch {e_warm}")
        if e_warm is not None:
            saved.append(e_scratch - e_warm)
    print(f"epochs saved by the warm start, per seed: {saved} (median "
          f"{float(np.median(saved)) if saved else 'n/a'} of {args.epochs})")


if __name__ == "__main__":
    main()
