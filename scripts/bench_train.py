"""Training speed, measured in one invocation.

    .venv/bin/python scripts/bench_train.py overhead [--epochs 6]
    .venv/bin/python scripts/bench_train.py speedrun [--seeds 5] [--accelerator auto|cpu|gpu]
    .venv/bin/python scripts/bench_train.py startup --model MODEL.onnx [--seeds 5]

overhead: the product's Lightning fit (checkpointing, CSV logging, metrics, guards) against
a minimal hand-written PyTorch loop over the same in-memory batches of the real MNIST, same
model (the MNIST convnet), optimizer, schedule and epochs, both validating once per epoch.
Prints the median wall time per epoch (first epoch excluded) and the ratio.

speedrun: runs `trainer fit --config configs/mnist_speedrun.yaml` once per seed and prints
the mean and minimum test accuracy, the median and range of the fit time (from
metrics.json) and of the whole process, each phase of `trainer fit` (its `time:` line, kept
in metrics.json) and the whole process over the epochs (#28's goal <= 1.6x) beside this
machine's floor for it (interpreter + `import lightning.pytorch`, timed in the same run);
then the start-up of the deploy commands on the last seed's model, whole processes:
`trainer inspect`, `trainer predict` over 100 rows, `trainer serve` until /health answers
(`startup` times only these, on MODEL, --seeds times each).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from trainer.callbacks import NonFiniteGuard, RunReport
from trainer.allocator import tune_cpu_allocator
from trainer.data.datamodule import FixedDataModule
from trainer.module import ClassifierModule

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, ratio_of_medians, spread  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist"
MODEL = {"arch": "convnet", "width": 16, "lr": 3e-3, "schedule": "onecycle"}
BATCHES = 100  # training batches per epoch (of 256 images), to keep the run short on a CPU


def hand_written(dm: FixedDataModule, epochs: int) -> list[float]:
    """The loop a careful engineer writes by hand: no framework at all."""
    torch.manual_seed(0)
    module = ClassifierModule(data_info=dm.info, **MODEL)
    net, loss_fn = module.net, torch.nn.CrossEntropyLoss()
    train, val = dm.train_dataloader(), dm.val_dataloader()
    opt = torch.optim.AdamW(net.parameters(), lr=MODEL["lr"], weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=MODEL["lr"],
                                                total_steps=epochs * BATCHES)
    starts = []
    for epoch in range(epochs):
        starts.append(time.perf_counter())
        net.train()
        train.sampler.set_epoch(epoch)
        for step, (x, y) in enumerate(train):
            if step == BATCHES:
                break
            loss = loss_fn(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        net.eval()
        correct = 0
        with torch.no_grad():
            for x, y in val:
                correct += int((net(x).argmax(1) == y).sum())
    starts.append(time.perf_counter())
    return [b - a for a, b in zip(starts, starts[1:])]


class _EpochClock(L.Callback):
    def __init__(self):
        self.starts: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.starts.append(time.perf_counter())

    def on_fit_end(self, trainer, pl_module):
        self.starts.append(time.perf_counter())


def with_lightning(dm: FixedDataModule, epochs: int, folder: Path) -> list[float]:
    """The product's fit: what `trainer fit` sets up, minus the ONNX export at the end."""
    torch.manual_seed(0)
    clock = _EpochClock()
    trainer = L.Trainer(
        max_epochs=epochs, limit_train_batches=BATCHES, logger=CSVLogger(folder),
        enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False,
        callbacks=[ModelCheckpoint(dirpath=folder, monitor="val/loss"),
                   ModelCheckpoint(dirpath=folder, filename="last", monitor=None),
                   NonFiniteGuard(), RunReport(plots=False), clock])
    trainer.fit(ClassifierModule(data_info=dm.info, **MODEL), dm)
    return [b - a for a, b in zip(clock.starts, clock.starts[1:])]


def overhead(epochs: int) -> None:
    def data():
        dm = FixedDataModule(source="mnist", root=str(MNIST), batch_size=256)
        dm.setup("fit")
        return dm

    hand_times = hand_written(data(), epochs)
    with tempfile.TemporaryDirectory() as tmp:
        lightning_times = with_lightning(data(), epochs, Path(tmp))
    dm = data()
    print(f"MNIST, {BATCHES} batches of 256 training images + {len(dm.splits['val'])} validation "
          f"images per epoch, convnet width 16, {epochs} epochs (the first is warm-up and not "
          f"counted), {torch.get_num_threads()} threads; seconds per epoch:")
    print(f"  trainer fit:       {spread(lightning_times[1:], '{:.3f}')}")
    print(f"  hand-written loop: {spread(hand_times[1:], '{:.3f}')}")
    print(f"ratio of medians, trainer fit / hand-written: "
          f"{ratio_of_medians(lightning_times[1:], hand_times[1:]):.3f}x")


def _whole(command: list[str], **kw) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, **kw)
    return time.perf_counter() - start


def speedrun(seeds: int, accelerator: str) -> Path:
    """The speedrun's whole processes with their phases; returns the last seed's model."""
    fits, accs, processes, ratios, hardware = [], [], [], [], None
    phases: dict[str, list[float]] = {}
    keep = Path(tempfile.mkdtemp(prefix="speedrun-model-"))
    for seed in range(seeds):
        with tempfile.TemporaryDirectory() as tmp:
            processes.append(_whole([
                sys.executable, "-m", "trainer", "fit", "--config",
                str(ROOT / "configs" / "mnist_speedrun.yaml"), "--data.root", str(MNIST),
                "--seed_everything", str(seed), "--trainer.logger.init_args.save_dir", tmp,
                "--trainer.accelerator", accelerator, "--trainer.enable_progress_bar", "false"]))
            run = next(Path(tmp).glob("*/version_*"))
            summary = json.loads((run / "metrics.json").read_text())
            (run / "model.onnx").replace(keep / "model.onnx")
        fits.append(sum(summary["seconds_per_epoch"]))
        accs.append(summary["test"]["test/acc"])
        for name, seconds in summary["phases"].items():
            phases.setdefault(name, []).append(seconds)
        ratios.append(processes[-1] / summary["phases"]["epochs"])  # exit included
        hardware = summary.get("hardware")
        print(f"  seed {seed}: fit {fits[-1]:.2f} s, test accuracy {accs[-1]:.4f}, "
              f"whole / epochs {ratios[-1]:.2f}x")
    hw = hardware or {}
    print(f"mnist_speedrun, {summary['epochs']} epochs, {seeds} seeds; precision "
          f"{hw.get('precision')} ({hw.get('reason')}); channels_last {hw.get('channels_last')} "
          f"({hw.get('layout_reason')})")
    print(f"  test accuracy: mean {statistics.mean(accs):.4f}, minimum {min(accs):.4f}")
    print(f"  fit (training + validation) seconds: {spread(fits, '{:.2f}')}")
    print(f"  whole process seconds: {spread(processes, '{:.2f}')}")
    for name, values in phases.items():
        print(f"  phase {name}: {spread(values, '{:.2f}')} s")
    print(f"  whole process / epochs: {spread(ratios, '{:.2f}')}x (goal <= 1.6x)")
    # The floor of any training command: the interpreter and `import lightning` (and no
    # interpreter teardown, which `trainer` skips: trainer.cli.exit_process).
    floor = [_whole([sys.executable, "-c", "import os, lightning.pytorch; os._exit(0)"])
             for _ in range(seeds)]
    epochs = statistics.median(phases["epochs"])
    print(f"  floor: python -c 'import lightning.pytorch' {spread(floor, '{:.2f}')} s; "
          f"(epochs + that) / epochs = {(epochs + statistics.median(floor)) / epochs:.2f}x")
    return keep / "model.onnx"


def startup(model: Path, repeats: int) -> None:
    """Whole processes of the deploy commands on the speedrun's model: inspect, predict
    over 100 MNIST test images, and serve from its start until /health answers."""
    from bench_serve import start_serve, stop

    rows = model.parent / "rows.npz"
    import numpy as np

    np.savez(rows, x=np.zeros((100, 1, 28, 28), np.uint8))
    trainer = [sys.executable, "-m", "trainer"]
    inspect = [_whole([*trainer, "inspect", str(model)]) for _ in range(repeats)]
    predict = [_whole([*trainer, "predict", "--model", str(model), "--input", str(rows),
                       "--output", str(model.parent / f"p{i}.csv")]) for i in range(repeats)]
    serve = []
    for _ in range(repeats):
        start = time.perf_counter()
        proc, _port = start_serve(model, "--workers", "1")
        serve.append(time.perf_counter() - start)
        stop(proc)
    print(f"start-up, whole processes, {repeats} each: trainer inspect {spread(inspect, '{:.2f}')} s "
          f"(goal <= 0.5 s); trainer predict (100 rows) {spread(predict, '{:.2f}')} s; "
          f"trainer serve until /health answers {spread(serve, '{:.2f}')} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["overhead", "speedrun", "startup"])
    p.add_argument("--model", type=Path, help="startup: the deploy commands' model (without "
                   "it, `speedrun` trains one and then times them)")
    p.add_argument("--epochs", type=int, default=6, help="overhead: epochs per arm")
    p.add_argument("--seeds", type=int, default=5, help="speedrun: seeds to run")
    p.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "gpu"],
                   help="speedrun: the recipe's accelerator (auto: a GPU where there is one)")
    args = p.parse_args()
    if not MNIST.is_dir():
        raise SystemExit(f"{MNIST}: real MNIST not found")
    print(describe())
    tune_cpu_allocator()  # as `trainer fit` does; both arms of the comparison share it
    if args.what == "overhead":
        overhead(args.epochs)
    elif args.what == "startup" and args.model:
        startup(args.model.resolve(), args.seeds)
    else:
        startup(speedrun(args.seeds, args.accelerator), args.seeds)


if __name__ == "__main__":
    main()
