"""Drift: how far a batch's inputs and predictions are from the training data the model
card describes. numpy only.

Per input channel (images) or feature (tables), the batch's histogram is compared with the
training histogram by the population stability index, PSI = sum((a - e) * ln(a / e)) over
bins. So are the predicted-class distribution (against the training label frequencies) and
the confidence distribution (against the validation set's). Thresholds follow the usual
reading of PSI: below 0.1 stable, 0.1-0.25 a shift worth a look (warn), above 0.25 drift,
applied to the PSI in excess of the noise floor that finite samples alone produce.
"""

from __future__ import annotations

import numpy as np

PSI_WARN, PSI_DRIFT = 0.1, 0.25
CONFIDENCE_BINS = 20
EPS = 1e-4  # floor for empty bins, so PSI stays finite


def bin_index(values: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    """Bin of each value over [lo, hi] in `bins` equal bins; values outside land in the edge
    bins (deployment values beyond the training range are counted, not dropped)."""
    scaled = (np.asarray(values, dtype=np.float64) - lo) * (bins / (hi - lo))
    return np.clip(scaled, 0, bins - 1).astype(np.int64)


def bin_counts(values: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    return np.bincount(bin_index(values, lo, hi, bins).ravel(), minlength=bins)


def psi(expected: np.ndarray, actual_counts: np.ndarray) -> float:
    e = np.maximum(np.asarray(expected, np.float64), EPS)
    a = np.maximum(actual_counts / max(1, actual_counts.sum()), EPS)
    e, a = e / e.sum(), a / a.sum()
    return float(((a - e) * np.log(a / e)).sum())


def status(value: float) -> str:
    return "drift" if value >= PSI_DRIFT else "warn" if value >= PSI_WARN else "ok"


def check(expected, actual_counts: np.ndarray, reference_n: float) -> dict:
    """PSI of a batch histogram against a reference, judged net of sampling noise.

    Two samples of one distribution still differ: without any drift PSI averages about
    (bins - 1) * (1/n + 1/m) for n batch and m reference samples, and stays below twice that
    19 times in 20 (simulated). The noise floor is that twice-the-mean; the status compares
    PSI minus the floor with the thresholds, so a small batch is not flagged for being
    small. For large batches the floor vanishes (0.008 for 10,000 rows in 20 bins)."""
    value = psi(expected, actual_counts)
    bins = int(((np.asarray(expected) > 0) | (actual_counts > 0)).sum())
    noise = 2 * max(bins - 1, 0) * (1 / max(1, actual_counts.sum()) + 1 / max(1.0, reference_n))
    return {"psi": value, "noise_floor": noise, "status": status(value - noise)}


class DriftAccumulator:
    """Adds up a batch job's histograms chunk by chunk; `state()` is JSON-ready, so an
    interrupted job can resume its statistics too."""

    def __init__(self, card: dict):
        self.card = card
        stats = card["training_stats"]
        hist = stats["histogram"]
        self.lo, self.hi = hist["range"]
        self.bins = hist["bins"]
        channels = len(stats["mean"])
        n_cls = len(card["class_names"])
        self.counts = {"inputs": np.zeros((channels, self.bins), np.int64),
                       "sums": np.zeros((channels, 2), np.float64),  # sum, sum of squares
                       "outputs": np.zeros(n_cls or self.bins, np.int64),
                       "confidence": np.zeros(CONFIDENCE_BINS, np.int64)}
        self.values_per_channel = 0

    def update(self, x: np.ndarray, pred) -> None:
        per = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)  # (C, N*H*W) or (F, N)
        for c, row in enumerate(per):
            if row.dtype == np.uint8:
                # Count the 256 possible values once; bins, sum and sum of squares follow
                # from those counts without float copies of the batch.
                values = np.arange(256, dtype=np.float64)
                counts = np.bincount(row, minlength=256)
                lut = bin_index(values, self.lo, self.hi, self.bins)
                self.counts["inputs"][c] += np.bincount(lut, weights=counts,
                                                        minlength=self.bins).astype(np.int64)
                self.counts["sums"][c] += (counts @ values, counts @ (values * values))
            else:
                self.counts["inputs"][c] += bin_counts(row, self.lo, self.hi, self.bins)
                row = row.astype(np.float64)
                self.counts["sums"][c] += (row.sum(), row @ row)
        self.values_per_channel += per.shape[1]
        if pred.values is not None:
            target = self.card["training_stats"]["target"]["histogram"]
            self.counts["outputs"] += bin_counts(pred.values, *target["range"], target["bins"])
        else:
            self.counts["outputs"] += np.bincount(pred.labels, minlength=len(self.counts["outputs"]))
            self.counts["confidence"] += bin_counts(pred.confidence, 0.0, 1.0, CONFIDENCE_BINS)

    def state(self) -> dict:
        return {"counts": {k: v.tolist() for k, v in self.counts.items()},
                "values_per_channel": self.values_per_channel}

    def merge(self, state: dict) -> None:
        for k, v in state["counts"].items():
            self.counts[k] += np.asarray(v, dtype=self.counts[k].dtype)
        self.values_per_channel += state["values_per_channel"]

    def report(self) -> dict:
        card, stats = self.card, self.card["training_stats"]
        names = card["input"].get("columns") or [f"channel {c}" for c in range(len(stats["mean"]))]
        n = max(1, self.values_per_channel)
        per_row = int(np.prod(card["input"]["shape"][1:])) if card["input"]["kind"] == "image" else 1
        train_values = stats["samples"] * per_row  # reference values per channel
        inputs = []
        for c, name in enumerate(names):
            result = check(stats["histogram"]["frequencies"][c], self.counts["inputs"][c],
                           train_values)
            inputs.append({"name": name, **result, "mean": self.counts["sums"][c, 0] / n,
                           "train_mean": stats["mean"][c]})
        if card["task"] == "regression":
            expected = stats["target"]["histogram"]["frequencies"]
            reference = "training target distribution"
        else:
            counts = np.asarray(stats["class_counts"], np.float64)
            expected, reference = counts / counts.sum(), "training label frequencies"
        report = {
            "thresholds": {"warn": PSI_WARN, "drift": PSI_DRIFT},
            "inputs": inputs,
            "predictions": {**check(expected, self.counts["outputs"], stats["samples"]),
                            "reference": reference, "counts": self.counts["outputs"].tolist()},
        }
        conf = card.get("validation_confidence")
        if conf and card["task"] != "regression":
            centers = (np.arange(CONFIDENCE_BINS) + 0.5) / CONFIDENCE_BINS
            mean = float((self.counts["confidence"] * centers).sum() /
                         max(1, self.counts["confidence"].sum()))
            report["confidence"] = {**check(conf["frequencies"], self.counts["confidence"],
                                            conf["samples"]),
                                    "mean": mean, "validation_mean": conf["mean"]}
        checks = [i["status"] for i in inputs] + [report["predictions"]["status"]]
        checks += [report["confidence"]["status"]] if "confidence" in report else []
        report["status"] = "drift" if "drift" in checks else "warn" if "warn" in checks else "ok"
        return report


def format_report(report: dict, limit: int = 12) -> str:
    """A short table: the worst inputs, the predictions, the confidence."""
    lines = [f"drift: {report['status'].upper()} (PSI warn >= {PSI_WARN}, drift >= {PSI_DRIFT})",
             f"  {'check':28} {'PSI':>8} {'noise':>7}  status"]
    worst = sorted(report["inputs"], key=lambda i: -i["psi"])
    for item in worst[:limit]:
        lines.append(f"  input {item['name'][:22]:22} {item['psi']:8.4f} {item['noise_floor']:7.4f}"
                     f"  {item['status']}")
    if len(worst) > limit:
        lines.append(f"  ... {len(worst) - limit} more inputs, all with lower PSI")
    p = report["predictions"]
    lines.append(f"  {'predicted distribution':28} {p['psi']:8.4f} {p['noise_floor']:7.4f}"
                 f"  {p['status']}")
    if "confidence" in report:
        c = report["confidence"]
        lines.append(f"  {'confidence distribution':28} {c['psi']:8.4f} {c['noise_floor']:7.4f}"
                     f"  {c['status']} (mean {c['mean']:.3f} vs validation "
                     f"{c['validation_mean']:.3f})")
    return "\n".join(lines)
