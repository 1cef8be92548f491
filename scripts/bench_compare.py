"""The comparison gate's error rates, measured on real MNIST:

    .venv/bin/python scripts/bench_compare.py [--mnist ../shared/data/mnist] [--seeds 5]
                                              [--alpha 0.05] [--repeats 100]

`--seeds` models of the MNIST speedrun recipe (same recipe, different seeds: equal quality)
predict the 10,000 test images through the deployed Predictor; each row's right/wrong is
what `trainer compare` tests (export/compare.compare_classifiers).

(a) False promotions with --require better: every ordered pair of different seeds, on
    `--repeats` random evaluation subsets of 1,000 rows and on all 10,000 rows; and each
    model against itself. Goal: a rate <= alpha.
(b) Power: the challenger is a real model, the champion another seed's model with 1 or 2
    points of accuracy taken away (that many of its right rows, chosen at random, made
    wrong), so the two also disagree both ways as real models do; the rate at which
    `better` is found at 1,000 and 10,000 evaluation rows, `--repeats` times.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from machine import describe, run_trainer as trainer  # noqa: E402

from export.compare import compare_classifiers  # noqa: E402
from export.runtime import Predictor  # noqa: E402


def rights(work: Path, mnist: str, seeds: int) -> list[np.ndarray]:
    recipe = ["--config", str(ROOT / "configs" / "mnist_speedrun.yaml"), "--data.root", mnist]
    trainer(work, "data", *recipe, "--split", "test", "--out", str(work / "test.npz"))
    data = np.load(work / "test.npz")
    out = []
    for seed in range(seeds):
        trainer(work, "fit", *recipe, "--seed_everything", str(seed),
                "--trainer.enable_progress_bar", "false",
                "--trainer.logger.init_args.name", f"seed{seed}")
        model = next((work / "runs" / f"seed{seed}").rglob("model.onnx"))
        out.append(Predictor(model, provider="cpu").predict(data["x"]).labels == data["y"])
        print(f"  seed {seed}: test accuracy {out[-1].mean():.4f}", flush=True)
    return out


def rate(verdicts: list[str]) -> str:
    k = sum(v == "better" for v in verdicts)
    return f"{k}/{len(verdicts)} = {k / len(verdicts):.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mnist", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--repeats", type=int, default=100)
    args = p.parse_args()
    print(describe())
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        right = rights(Path(tmp), args.mnist, args.seeds)
    n = len(right[0])
    pairs = list(itertools.permutations(range(args.seeds), 2))

    def verdict(a, b, rows):
        return compare_classifiers(a[rows], b[rows], args.alpha, 0.0).verdict

    print(f"\n(a) false promotions (--require better), alpha {args.alpha}:")
    for size in (1000, n):
        repeats = args.repeats if size < n else 1
        subsets = [rng.choice(n, size, replace=False) for _ in range(repeats)]
        found = [verdict(right[i], right[j], s) for i, j in pairs for s in subsets]
        print(f"  {len(pairs)} ordered pairs of seeds x {repeats} subsets of {size:,} rows: "
              f"{rate(found)}")
    itself = [verdict(r, r, rng.choice(n, 1000, replace=False)) for r in right]
    print(f"  each model against itself: {rate(itself)}")
    print("\n(b) power: the champion is another seed's model with some right rows made wrong")
    for points in (1, 2):
        for size in (1000, n):
            found = []
            for i in range(args.repeats):
                b, a = right[i % args.seeds], right[(i + 1) % args.seeds].copy()
                a[rng.choice(np.flatnonzero(a), int(points / 100 * n), replace=False)] = False
                rows = rng.choice(n, size, replace=False) if size < n else np.arange(n)
                found.append(verdict(a, b, rows))
            print(f"  +{points} point(s), {size:,} rows: better found in {rate(found)}")


if __name__ == "__main__":
    main()
