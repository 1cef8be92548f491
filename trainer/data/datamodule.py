"""The LightningDataModule over a FixedDataset held in memory."""

from __future__ import annotations

from functools import cached_property

import lightning as L
import numpy as np
import torch

from trainer.data.dataset import FixedDataset, Split
from trainer.data.loader import EpochSampler, InMemoryLoader
from trainer.data.sources import load_source
from trainer.data.split import stratified_split
from trainer.data.stats import training_stats


class FixedDataModule(L.LightningDataModule):
    def __init__(
        self,
        source: str = "digits",
        root: str | None = None,
        batch_size: int = 64,
        eval_batch_size: int = 1024,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        gpu_memory_budget_gb: float = 4.0,
    ):
        """
        Args:
            source: Dataset source: digits (embedded), mnist (IDX folder), arrays (.npz).
            root: Folder or file the source reads; unused by digits.
            batch_size: Training batch size per device.
            eval_batch_size: Batch size for validation and test.
            val_fraction: Share of the training rows held out for validation (stratified).
            test_fraction: Share held out for test when the source has no test split.
            seed: Seeds the train/val/test split and the per-epoch shuffle.
            gpu_memory_budget_gb: On CUDA, keep the dataset on the GPU if it fits in this.
        """
        super().__init__()
        for flag, value in (("data.val_fraction", val_fraction),
                            ("data.test_fraction", test_fraction)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{flag} must be in [0, 1), got {value}")
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError("data.batch_size and data.eval_batch_size must be >= 1")
        self.save_hyperparameters()
        self.tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @cached_property
    def dataset(self) -> FixedDataset:
        return load_source(self.hparams.source, self.hparams.root)

    @cached_property
    def splits(self) -> dict[str, Split]:
        """train/val/test as numpy arrays, decided once by `seed`."""
        ds, hp = self.dataset, self.hparams
        if ds.test is not None:
            train_idx, val_idx = stratified_split(ds.train.y, [1 - hp.val_fraction], hp.seed)
            test = ds.test
        else:
            fracs = [1 - hp.val_fraction - hp.test_fraction, hp.val_fraction]
            train_idx, val_idx, test_idx = stratified_split(ds.train.y, fracs, hp.seed)
            test = Split(ds.train.x[test_idx], ds.train.y[test_idx])
        take = lambda idx: Split(ds.train.x[idx], ds.train.y[idx])  # noqa: E731
        return {"train": take(train_idx), "val": take(val_idx), "test": test}

    @cached_property
    def info(self) -> dict:
        """Everything downstream needs to know about the data, JSON-ready: it travels in
        the checkpoint's hyperparameters and from there into the ONNX model card."""
        ds, train = self.dataset, self.splits["train"]
        stats = training_stats(train.x, train.y, ds.num_classes, ds.input_spec["value_range"])
        return {
            "input": ds.input_spec,
            "class_names": ds.class_names,
            "normalization": {"mean": stats["mean"], "std": stats["std"]},
            "dataset": {
                "name": ds.name,
                "source": self.hparams.source,
                "fingerprint": ds.fingerprint,
                "split_seed": self.hparams.seed,
                "split_sizes": {k: len(v) for k, v in self.splits.items()},
            },
            "stats": stats,
        }

    def setup(self, stage: str) -> None:
        device = torch.device("cpu")
        trainer = self.trainer
        if trainer is not None and trainer.strategy.root_device.type == "cuda":
            nbytes = sum(s.x.nbytes + s.y.nbytes for s in self.splits.values())
            if nbytes <= self.hparams.gpu_memory_budget_gb * 2**30:
                device = trainer.strategy.root_device
        for name, split in self.splits.items():
            if name not in self.tensors:
                self.tensors[name] = (torch.from_numpy(np.ascontiguousarray(split.x)).to(device),
                                      torch.from_numpy(split.y).to(device))

    def _loader(self, split: str, train: bool) -> InMemoryLoader:
        x, y = self.tensors[split]
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        sampler = EpochSampler(len(y), shuffle=train, seed=self.hparams.seed,
                               rank=rank, world_size=world)
        bs = self.hparams.batch_size if train else self.hparams.eval_batch_size
        return InMemoryLoader(x, y, bs, sampler, drop_last=train and len(sampler) > bs)

    def train_dataloader(self) -> InMemoryLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> InMemoryLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> InMemoryLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> InMemoryLoader:
        return self._loader("test", train=False)
