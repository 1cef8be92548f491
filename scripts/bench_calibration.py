"""Calibration and conformal coverage, measured over seeds:

    .venv/bin/python scripts/bench_calibration.py [--mnist ../shared/data/mnist] [--seeds 5]
                                                  [--only mnist|wine]

For each seed, `trainer fit` (which exports through the calibration) on the real MNIST
speedrun recipe and on the wine table (scikit-learn's, 178 rows, 30% validation); then the
exported graph predicts the test split through the deployed Predictor. Printed: test ECE
before and after temperature scaling (from the card), the temperature, and at coverages
0.8, 0.9 and 0.95 the coverage reached on the test split and the mean set size; each as
the median (range) over the seeds. The baseline in the same run is the uncalibrated
softmax (ECE before).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from machine import describe, run_trainer as trainer  # noqa: E402

from export.card import read_card  # noqa: E402
from export.conformal import set_mask, threshold  # noqa: E402
from export.runtime import Predictor  # noqa: E402

COVERAGES = (0.8, 0.9, 0.95)


def measure(work: Path, recipe: list[str], seed: int, test: Path) -> dict:
    name = f"seed{seed}"
    trainer(work, "fit", *recipe, "--seed_everything", str(seed), "--data.seed", str(seed),
            "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.name", name)
    model = sorted((work / "runs" / name).glob("version_*"))[-1] / "model.onnx"
    if not test.exists():
        trainer(work, "data", *recipe, "--data.seed", str(seed), "--split", "test",
                "--out", str(test))
    card, data = read_card(model), np.load(test)
    cal = card.calibration
    pred = Predictor(model, provider="cpu").predict(data["x"])
    y = data["y"].astype(np.int64)
    out = {"T": cal.temperature, "ece_before": cal.test_before.ece,
           "ece_after": cal.test_after.ece, "acc": float((pred.labels == y).mean()),
           "rows": len(cal.scores)}
    for c in COVERAGES:
        try:
            mask = set_mask(pred.probabilities, threshold(cal, c, str(model)))
        except Exception as exc:  # too few calibration rows for this coverage
            out[c] = (float("nan"), float("nan"), str(exc).split(": ")[-1])
            continue
        out[c] = (float(mask[np.arange(len(y)), y].mean()), float(mask.sum(1).mean()), "")
    test.unlink()  # the split depends on the seed for tables
    return out


def summary(values: list[float], fmt: str = "{:.4f}") -> str:
    v = np.asarray([x for x in values if x == x])
    if not len(v):
        return "n/a"
    return f"{fmt.format(np.median(v))} ({fmt.format(v.min())}-{fmt.format(v.max())})"


def report(name: str, runs: list[dict]) -> None:
    print(f"\n{name}: {len(runs)} seeds, test rows scored by the exported graph; "
          f"{runs[0]['rows']} conformal rows per model")
    print(f"  temperature        {summary([r['T'] for r in runs], '{:.3f}')}")
    print(f"  test ECE before    {summary([r['ece_before'] for r in runs])}")
    print(f"  test ECE after     {summary([r['ece_after'] for r in runs])}")
    print(f"  test accuracy      {summary([r['acc'] for r in runs])}")
    for c in COVERAGES:
        notes = {r[c][2] for r in runs if r[c][2]}
        print(f"  coverage {c:.2f}: reached {summary([r[c][0] for r in runs])}, mean set size "
              f"{summary([r[c][1] for r in runs], '{:.3f}')}" + (f"  [{notes.pop()}]" if notes
                                                                  else ""))


def wine_csv(path: Path) -> None:
    from sklearn.datasets import load_wine

    wine = load_wine()
    names = np.array(["barolo", "grignolino", "barbera"])[wine.target]
    lines = [",".join([*wine.feature_names, "cultivar"])]
    lines += [",".join([*(f"{v:.6g}" for v in row), n]) for row, n in zip(wine.data, names)]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mnist", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--only", choices=["mnist", "wine"])
    args = p.parse_args()
    print(describe())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.only != "wine":
            recipe = ["--config", str(ROOT / "configs" / "mnist_speedrun.yaml"),
                      "--data.root", args.mnist]
            report("MNIST speedrun", [measure(work, recipe, s, work / "mnist.npz")
                                      for s in range(args.seeds)])
        if args.only != "mnist":
            wine_csv(work / "wine.csv")
            recipe = ["--config", str(ROOT / "configs" / "tabular.yaml"), "--data.root",
                      "wine.csv", "--data.target", "cultivar", "--data.val_fraction", "0.3"]
            report("wine (MLP)", [measure(work, recipe, s, work / "wine.npz")
                                  for s in range(args.seeds)])


if __name__ == "__main__":
    main()
