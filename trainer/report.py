"""Files a run leaves behind: metrics.json, curves.png, confusion_matrix.png, calibration.png."""

from __future__ import annotations

import json
from pathlib import Path

from export.atomic import atomic_path


def write_metrics(path: Path, epochs: list[dict], test: dict, best_callback,
                  hardware: dict | None = None, phases: dict | None = None) -> Path:
    val_keys = [k for k in epochs[-1] if k.startswith("val/")]
    summary = {
        "hardware": hardware,
        "epochs": len(epochs),
        "final": {k: epochs[-1][k] for k in val_keys},
        "best": None,
        "test": test or None,
        "seconds_per_epoch": [round(e["seconds"], 4) for e in epochs],
        "samples_per_second": round(sum(e["samples_per_second"] for e in epochs) / len(epochs), 1),
        "history": epochs,
        "phases": phases,
    }
    if best_callback is not None and best_callback.best_model_score is not None:
        monitor = best_callback.monitor
        best = min(epochs, key=lambda e: e.get(monitor, float("inf"))) if best_callback.mode == "min" \
            else max(epochs, key=lambda e: e.get(monitor, float("-inf")))
        summary["best"] = {"monitor": monitor, "score": float(best_callback.best_model_score),
                           "checkpoint": best_callback.best_model_path,
                           "epoch": best["epoch"], **{k: best[k] for k in val_keys if k in best}}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    return path


def write_evaluation(path: Path, stage: str, checkpoint: str | None, metrics: dict) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"stage": stage, "checkpoint": checkpoint, "metrics": metrics},
                                  indent=2))
    return path


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def save_curves(epochs: list[dict], path: Path) -> None:
    """Loss and the task metric per epoch, train and validation."""
    plt = _figure()
    metric = "acc" if any("val/acc" in e for e in epochs) else "mae"
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = [e["epoch"] for e in epochs]
    for ax, name in zip(axes, ("loss", metric)):
        for stage, key in (("train", f"train/{name}"), ("val", f"val/{name}")):
            ys = [e.get(key) for e in epochs]
            if any(y is not None for y in ys):
                ax.plot(x, ys, marker="o", label=stage)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def save_confusion_matrix(metric, matrix, class_names: list[str], path: Path) -> None:
    """Plot a computed torchmetrics confusion matrix (test split) with class names."""
    plt = _figure()
    fig, ax = metric.plot(val=matrix, labels=class_names)
    ax.set_title("test confusion matrix")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def save_reliability(calibration, path: Path) -> None:
    """The reliability diagram of the card's calibration record: accuracy against mean
    confidence per confidence bin, before and after temperature scaling."""
    plt = _figure()
    rel = calibration.reliability
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfectly calibrated")
    quality = {"before": calibration.test_before or calibration.fit_before,
               "after": calibration.test_after or calibration.fit_after}
    for side, marker in (("before", "o"), ("after", "s")):
        kept = [(c, a) for n, c, a in zip(rel[side]["count"], rel[side]["confidence"],
                                          rel[side]["accuracy"]) if n]
        label = side if quality[side] is None else f"{side} (ECE {quality[side].ece:.3f})"
        ax.plot(*zip(*kept), marker=marker, label=label)
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title=f"reliability, {rel['rows']} rows, T={calibration.temperature or 1:.3g}")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
