"""How often the drift report cries wolf, and how often it catches real drift.

    .venv/bin/python scripts/bench_drift.py [--batches 200] [--ckpt MNIST_CKPT]

Images: an MNIST convnet (trained briefly, as bench_export.py does, unless --ckpt) is
exported; its card's drift reference is the 6,000-row validation split. In-distribution
batches are drawn from the real MNIST test split (without replacement up to 1,000 rows;
with replacement for 10,000, the size of the split itself). Shifted batches come from
the test split changed as named: inverted, Gaussian noise (sigma 40), brightness x0.6,
rotated 15 degrees, or drawn from three classes only.

Table: the wine data (178 rows) with an MLP. A table that small cannot supply independent
batches of 10,000 rows, so the population is the table itself: the reference is 20,000
rows drawn from it (`trainer export --samples`) and every batch is a fresh draw from it;
the shift scales one feature (alcohol) by 1.5.

For each case: the share of batches whose status is warn or drift (false alarms) or is `drift`
(detections), over `--batches` batches, with a 95% Wilson interval. Goals: false alarms
<= 5% at every size; detection >= 95% at 5,000 rows and >= 90% at 500.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

from export.drift import DriftAccumulator  # noqa: E402
from export.readers import read_idx  # noqa: E402
from export.runtime import Prediction, Predictor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist"


def quick_mnist_checkpoint(out: Path) -> Path:
    """The MNIST convnet trained for 150 steps (about 97.8% test accuracy), with a 6,000-row
    validation split to serve as the drift reference."""
    import lightning as L

    from trainer.data.datamodule import FixedDataModule
    from trainer.module import ClassifierModule

    dm = FixedDataModule(source="mnist", root=str(MNIST), batch_size=256, val_fraction=0.1)
    model = ClassifierModule(arch="convnet", width=32, lr=4e-3, data_info=dm.info)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=150, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(model, dm)
    trainer.save_checkpoint(out)
    return out


def wilson(k: int, n: int) -> tuple[float, float]:
    z, p = 1.96, k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(card: dict, x: np.ndarray, pred: Prediction, pool: np.ndarray, size: int,
         batches: int, rng, hit: set[str], replace: bool = False) -> tuple[int, int]:
    """Batches of `size` rows from `pool` whose report status is in `hit`; drawn without
    replacement unless `replace` or the pool is too small for it."""
    count = 0
    for _ in range(batches):
        idx = rng.choice(pool, size, replace=replace or size > len(pool) // 2)
        drift = DriftAccumulator(card)
        drift.update(x[idx], _subset(pred, idx))
        count += drift.report()["status"] in hit
    return count, batches


def _subset(pred: Prediction, idx) -> Prediction:
    return Prediction(**{k: None if v is None else v[idx] for k, v in vars(pred).items()})


def line(name: str, size: int, k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"  {name:34} {size:>6} rows: {100 * k / n:5.1f}%  (95% CI {100 * lo:.1f}-{100 * hi:.1f}%)"


def mnist_cases(work: Path, ckpt: str | None) -> tuple[Predictor, dict[str, np.ndarray], np.ndarray]:
    from PIL import Image

    from trainer.freeze import export_checkpoint

    ckpt = Path(ckpt) if ckpt else quick_mnist_checkpoint(work / "mnist.ckpt")
    export_checkpoint(ckpt, work / "mnist.onnx")
    x = read_idx(MNIST / "t10k-images-idx3-ubyte.gz", 2051)[:, None]
    y = read_idx(MNIST / "t10k-labels-idx1-ubyte.gz", 2049)
    noise = np.random.default_rng(1).normal(0, 40, x.shape)
    rotated = np.stack([np.asarray(Image.fromarray(im[0]).rotate(
        15, Image.Resampling.BILINEAR))[None] for im in x])
    cases = {"in distribution": x, "inverted": 255 - x,
             "gaussian noise sigma 40": np.clip(np.rint(x + noise), 0, 255).astype(np.uint8),
             "brightness x0.6": np.rint(x * 0.6).astype(np.uint8),
             "rotated 15 degrees": rotated}
    return Predictor(work / "mnist.onnx"), cases, y


def wine_cases(work: Path) -> tuple[Predictor, dict[str, np.ndarray]]:
    from sklearn.datasets import load_wine

    wine = load_wine()
    table = work / "wine.csv"
    names = [n.replace("/", "_") for n in wine.feature_names]
    rows = [",".join([*names, "cultivar"])]
    rows += [",".join([*(f"{v:.6g}" for v in r), f"c{t}"]) for r, t in zip(wine.data, wine.target)]
    table.write_text("\n".join(rows) + "\n")
    trainer = [sys.executable, "-m", "trainer"]
    subprocess.run([*trainer, "fit", "--config", str(ROOT / "configs" / "tabular.yaml"),
                    "--data.root", str(table), "--data.target", "cultivar",
                    "--export.enabled", "false", "--report.plots", "false",
                    "--trainer.enable_progress_bar", "false"], cwd=work, check=True,
                   capture_output=True)
    ckpt = next((work / "runs" / "tabular").glob("version_*/checkpoints/best-*.ckpt"))
    x = wine.data.astype(np.float32)
    pick = np.random.default_rng(2).integers(0, len(x), 20_000)
    np.savez(work / "population.npz", x=x[pick], y=np.array([f"c{t}" for t in wine.target[pick]]))
    subprocess.run([*trainer, "export", "--ckpt", str(ckpt), "--out", str(work / "wine.onnx"),
                    "--samples", str(work / "population.npz")], check=True, capture_output=True)
    scaled = x.copy()
    scaled[:, 0] *= 1.5  # alcohol
    return Predictor(work / "wine.onnx"), {"in distribution": x, "feature alcohol x1.5": scaled}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--ckpt", help="an MNIST checkpoint (default: train one briefly)")
    args = p.parse_args()
    print(describe())
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        predictor, cases, y = mnist_cases(work, args.ckpt)
        preds = {name: predictor.predict(x, 1024) for name, x in cases.items()}
        card, x0, everyone = predictor.card, cases["in distribution"], np.arange(len(y))
        print(f"MNIST convnet, reference: {card.drift_reference.rows} validation rows; "
              f"test accuracy {(preds['in distribution'].labels == y).mean():.4f}")
        print("false alarms (status warn or drift) on in-distribution test batches:")
        for size in (30, 100, 300, 1000, 10_000):
            k, n = rate(card, x0, preds["in distribution"], everyone, size, args.batches, rng,
                        {"warn", "drift"})
            print(line("in distribution", size, k, n))
        print("detections (status drift) on shifted batches:")
        three = np.flatnonzero(np.isin(y, [0, 1, 2]))
        shifted = [(name, cases[name], preds[name], everyone) for name in cases
                   if name != "in distribution"]
        shifted.append(("three classes only", x0, preds["in distribution"], three))
        for name, x, pred, pool in shifted:
            for size in (500, 5000):
                k, n = rate(card, x, pred, pool, size, args.batches, rng, {"drift"})
                print(line(name, size, k, n))

        predictor, cases = wine_cases(work)
        card = predictor.card
        wine_preds = {name: predictor.predict(x) for name, x in cases.items()}
        pool = np.arange(len(cases["in distribution"]))
        print(f"wine MLP, reference: {card.drift_reference.rows} rows drawn from the table")
        for size in (30, 100, 300, 1000, 10_000):
            k, n = rate(card, cases["in distribution"], wine_preds["in distribution"], pool,
                        size, args.batches, rng, {"warn", "drift"}, replace=True)
            print(line("in distribution (false alarms)", size, k, n))
        for size in (500, 5000):
            k, n = rate(card, cases["feature alcohol x1.5"], wine_preds["feature alcohol x1.5"],
                        pool, size, args.batches, rng, {"drift"}, replace=True)
            print(line("alcohol x1.5 (detections)", size, k, n))


if __name__ == "__main__":
    main()
