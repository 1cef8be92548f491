"""Loader throughput on the real MNIST: this project's in-memory loader against two
baselines, in one invocation, each timed over the same number of batches and repeated.

    .venv/bin/python scripts/bench_data.py [--root ../shared/data/mnist] [--batch-size 256]

Both pipelines produce the same thing per batch: a random translation by up to 2 pixels
(RandomCrop(28, padding=2)) of a shuffled batch of uint8 images, turned into normalised
float32 (N, 1, 28, 28) and int64 labels.
- conventional: per item PIL image -> RandomCrop -> ToTensor -> Normalize, collated by a
  DataLoader with persistent workers (one per core);
- careful plain PyTorch: the decoded uint8 tensor in a TensorDataset, a DataLoader that
  samples whole batches (BatchSampler over a RandomSampler, batch_size=None, no workers),
  the same batched augmentation and normalisation;
- in-memory: FixedDataModule's loader (index slices of a per-epoch randperm) + the batched
  augmentation it applies on the device + the normalisation the model does.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms

from trainer.data.augment import augment_batch
from trainer.data.datamodule import FixedDataModule

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, ratio_of_medians, spread  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class TorchvisionStyleMNIST(torch.utils.data.Dataset):
    """What torchvision.datasets.MNIST.__getitem__ does: a PIL image per item + transform."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i], mode="L")
        return self.transform(img), int(self.labels[i])


def rate(make_batches, limit: int, warmup: int = 3) -> float:
    """Batches per second over `limit` batches after `warmup`, from a fresh iterator."""
    it = iter(make_batches())
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(limit):
        next(it)
    return limit / (time.perf_counter() - start)


def forever(loader):
    while True:
        yield from loader


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batches", type=int, default=60, help="batches timed per run and pipeline")
    p.add_argument("--runs", type=int, default=5, help="repetitions of each measurement")
    args = p.parse_args()
    if not Path(args.root).is_dir():
        raise SystemExit(f"{args.root}: MNIST folder not found (--root)")
    print(describe())

    dm = FixedDataModule(source="mnist", root=args.root, batch_size=args.batch_size,
                         crop_padding=2)
    dm.setup("fit")
    x, y = dm.splits["train"].arrays()
    mean, std = dm.info.normalization.mean[0], dm.info.normalization.std[0]

    tf = transforms.Compose([transforms.RandomCrop(28, padding=2), transforms.ToTensor(),
                             transforms.Normalize((mean / 255,), (std / 255,))])
    workers = os.cpu_count() or 1
    conventional = torch.utils.data.DataLoader(
        TorchvisionStyleMNIST(x[:, 0], y, tf), batch_size=args.batch_size, shuffle=True,
        num_workers=workers, persistent_workers=True, drop_last=True)
    tensors = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    batched = torch.utils.data.DataLoader(tensors, batch_size=None, sampler=torch.utils.data.BatchSampler(
        torch.utils.data.RandomSampler(tensors), args.batch_size, drop_last=True))

    def augmented(loader):
        gen = torch.Generator().manual_seed(0)
        for xb, yb in forever(loader):
            xb = augment_batch(xb, gen, crop_padding=2)
            yield (xb.float() - mean) / std, yb

    pipelines = {
        f"conventional Dataset+DataLoader ({workers} workers)": lambda: forever(conventional),
        "TensorDataset + DataLoader, batch sampling": lambda: augmented(batched),
        "in-memory loader + batched augmentation": lambda: augmented(dm.train_dataloader()),
    }
    rates = {name: [rate(make, args.batches) for _ in range(args.runs)]
             for name, make in pipelines.items()}
    print(f"MNIST train split {len(y)} images, batch size {args.batch_size}, {args.batches} "
          f"batches per run; batches/s, median (range):")
    for name, values in rates.items():
        print(f"  {name:52} {spread(values)}")
    ours = rates["in-memory loader + batched augmentation"]
    for name, values in list(rates.items())[:2]:
        print(f"ratio of medians, in-memory vs {name}: {ratio_of_medians(ours, values):.1f}x")


if __name__ == "__main__":
    main()
