"""The LightningDataModule over a FixedDataset: in memory (or on the GPU) when it fits the
budget, streamed from a memory map when it does not."""

from __future__ import annotations

import sys
from functools import cached_property
from typing import Literal

import lightning as L
import numpy as np
import torch

from export.dataset_card import DatasetInfo
from export.errors import InputError, check_options
from export.imaging import MAX_PIXELS
from export.timing import usable_cores
from trainer.data.augment import augment_batch, augmentation_seed
from trainer.data.copies import count_copies, keep_together
from trainer.data.dataset import FixedDataset, SourceOptions, Split
from trainer.data.info import DataInfo, Normalization
from trainer.data.loader import EpochSampler, InMemoryLoader, block_rows, streaming_loader
from trainer.data.sources import load_source
from trainer.data.split import split_notes
from trainer.data.stats import class_rows, training_stats


def check_data_options(*, val_fraction, test_fraction, batch_size, eval_batch_size, seed,
                       crop_padding, image_size, memory_budget_gb, gpu_memory_budget_gb,
                       num_workers, **_) -> None:
    """The ranges of the numeric options, checked by the CLI before any data is read and
    by the datamodule itself when a script builds it."""
    check_options(("data.val_fraction", val_fraction, 0 <= val_fraction < 1, "in [0, 1)"),
                  ("data.test_fraction", test_fraction, 0 <= test_fraction < 1, "in [0, 1)"),
                  ("data.batch_size", batch_size, batch_size >= 1, ">= 1"),
                  ("data.eval_batch_size", eval_batch_size, eval_batch_size >= 1, ">= 1"),
                  ("data.seed", seed, 0 <= seed < 2 ** 63, "in [0, 2**63)"),  # as numpy's
                  # generators and torch's take it
                  ("data.crop_padding", crop_padding, crop_padding >= 0, ">= 0"),
                  ("data.image_size", image_size, image_size is None or (
                      len(image_size) == 2 and min(image_size) >= 1 and
                      image_size[0] * image_size[1] <= MAX_PIXELS),  # as a file's header
                   f"two sizes >= 1 of at most {MAX_PIXELS:,} pixels in all"),
                  ("data.memory_budget_gb", memory_budget_gb, memory_budget_gb > 0, "> 0"),
                  ("data.gpu_memory_budget_gb", gpu_memory_budget_gb,
                   gpu_memory_budget_gb >= 0, ">= 0"),
                  ("data.num_workers", num_workers, 0 <= num_workers <= 4 * usable_cores(),
                   f"0 to {4 * usable_cores()} (each is a process: 4 per core of the "
                   f"{usable_cores()} this process may use)"))


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
        crop_padding: int = 0,
        hflip: bool = False,
        image_size: tuple[int, int] | None = None,
        color_mode: Literal["L", "RGB"] | None = None,
        target: str = "target",
        task: Literal["auto", "classification", "regression"] = "auto",
        exclude_columns: list[str] | None = None,
        cache_dir: str | None = None,
        verify_cache: bool = False,
        memory_budget_gb: float = 8.0,
        gpu_memory_budget_gb: float = 4.0,
        num_workers: int = 2,
    ):
        """
        Args:
            source: digits (embedded), mnist (IDX folder), cifar10 (python batches folder),
                image_folder (class sub-folders), tabular (.csv/.parquet), arrays (.npz).
            root: Folder or file the source reads; unused by digits.
            batch_size: Training batch size per device.
            eval_batch_size: Batch size for validation and test.
            val_fraction: Share of the training rows held out for validation (stratified),
                unless the source has its own validation split.
            test_fraction: Share held out for test when the source has no test split.
            seed: Seeds the train/val/test split, the per-epoch shuffle and augmentation.
            crop_padding: Images: random translation by up to this many pixels (0 = off).
            hflip: Images: random horizontal flip.
            image_size: image_folder: resize every image to (H, W); default: the first's size.
            color_mode: image_folder: L or RGB; default: the first image's mode.
            target: tabular: name of the target column.
            task: tabular: classification or regression; auto = floats are regression.
            exclude_columns: tabular: columns that are neither features nor the target (ids,
                hive partition keys); `trainer predict` passes them through.
            cache_dir: image_folder, tabular: where decoded rows are cached (default
                $FROZENFIT_CACHE or ~/.cache/frozenfit), per file and keyed by content.
            verify_cache: Re-hash every file (and re-check every cached row) instead of
                trusting an unchanged size, mtime and inode.
            memory_budget_gb: Above this the training data is streamed by a DataLoader with
                persistent workers instead of being held in RAM.
            gpu_memory_budget_gb: On CUDA, keep the in-memory dataset on the GPU if it fits.
            num_workers: Worker processes of the streaming loader.
        """
        super().__init__()
        check_data_options(**{k: v for k, v in locals().items() if k != "self"})
        self.save_hyperparameters(logger=False)  # loggers get the resolved config instead
        self.tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.kept_together = 0  # samples the split moved to the part of their first copy

    @cached_property
    def dataset(self) -> FixedDataset:
        hp = self.hparams
        opts = SourceOptions(image_size=hp.image_size, color_mode=hp.color_mode,
                             target=hp.target, task=hp.task,
                             exclude_columns=tuple(hp.exclude_columns or ()),
                             cache_dir=hp.cache_dir, verify_cache=hp.verify_cache)
        return load_source(hp.source, hp.root, opts)

    @cached_property
    def splits(self) -> dict[str, Split]:
        """train/val/test, decided once by `seed` (subsets of the source's arrays)."""
        ds, hp = self.dataset, self.hparams
        if ds.num_classes == 1:
            raise InputError(f"{ds.name}: one class ({ds.class_names[0]}); a classifier needs "
                             "at least two (for a numeric target, --data.task regression)")
        if ds.input_spec.image and hp.crop_padding >= min(ds.input_spec.shape[-2:]):
            # blank crops, and a padded batch that grows as the padding's square
            height, width = ds.input_spec.shape[-2:]
            raise InputError(f"data.crop_padding {hp.crop_padding}: the images are {height}x"
                             f"{width}; a translation by {min(height, width)} pixels or more "
                             "can leave none of the image in a crop")
        # Regression has no classes to stratify by: one stratum (no array: a broadcast zero)
        # is a seeded random split.
        strata = ds.train.y if ds.num_classes else np.broadcast_to(np.int8(0), len(ds.train))
        fracs = []
        if ds.val is None:
            fracs.append(hp.val_fraction)
        if ds.test is None:
            fracs.append(hp.test_fraction)
        # each row's part in a byte; the parts read through it (no rows or labels of their own)
        notes = split_notes(strata, fracs, hp.seed) if fracs else None
        if notes is not None and ds.history is not None:  # copies known by content
            self.kept_together = keep_together(notes, ds.train)
        parts = [ds.train.pick(notes, k) for k in range(len(fracs) + 1)] if fracs else [ds.train]
        held = iter(parts[:-1])
        out = {"train": parts[-1],
               "val": ds.val if ds.val is not None else next(held),
               "test": ds.test if ds.test is not None else next(held)}
        for name, split in out.items():
            if len(split) == 0:
                raise InputError(f"{ds.name}: the {name} split is empty; {self._too_few()}")
        return out

    def _too_few(self) -> str:
        """Why a drawn split came out empty: too few rows, or too few a class (a stratified
        split takes its fraction of each class, rounded), or copies kept together."""
        ds = self.dataset
        rows, k = len(ds.train), ds.num_classes
        why = f"the dataset has {rows:,} rows" + (f" in {k:,} classes" if k else "") + \
            " (data.val_fraction/test_fraction)"
        if k and rows < 4 * k:
            why += f": ~{rows / k:.1f} rows a class, and each class gives its fraction of them"
            if self.hparams.source == "tabular":  # an identifier or a measurement as a class
                why += "; is the target a class? (--data.target, --data.task regression)"
        if self.kept_together:
            why += f"; {self.kept_together:,} copies were kept in the split of their first"
        return why

    @cached_property
    def info(self) -> DataInfo:
        """Everything downstream needs to know about the data: it travels (as JSON) in the
        checkpoint's hyperparameters and from there into the ONNX model card."""
        ds, hp = self.dataset, self.hparams
        stats = training_stats(self.splits["train"], ds.num_classes, ds.input_spec.value_range,
                               hp.seed)
        copies = None if ds.history is None else count_copies(
            self.splits, self.kept_together, classes=ds.num_classes,
            labels_apart=ds.input_spec.image, given=ds.val is not None or ds.test is not None)
        if copies is not None and (line := copies.line()):
            print(f"data: {ds.name}: {line}", file=sys.stderr)
        val_counts = class_rows(self.splits["val"], ds.num_classes) if ds.num_classes else None
        dataset = DatasetInfo(
            name=ds.name, source=hp.source, fingerprint=ds.fingerprint, split_seed=hp.seed,
            split_sizes={k: len(v) for k, v in self.splits.items()}, copies=copies,
            val_class_counts=None if val_counts is None else tuple(val_counts.tolist()),
            target=hp.target if hp.source == "tabular" else None)
        if missing := dataset.unmeasured(ds.class_names):
            print(f"data: {ds.name}: no validation rows of class {missing}: val/acc, the "
                  "calibration and the gates do not measure its answers", file=sys.stderr)
        return DataInfo(
            task=ds.task, input=ds.input_spec, class_names=tuple(ds.class_names),
            normalization=Normalization(mean=tuple(stats["mean"]), std=tuple(stats["std"])),
            dataset=dataset, stats=stats)

    @property
    def streaming(self) -> bool:
        total = sum(s.nbytes for s in self.splits.values())
        return total > self.hparams.memory_budget_gb * 2**30

    def setup(self, stage: str) -> None:
        if self.streaming or self.tensors:
            return
        device = torch.device("cpu")
        trainer = self.trainer
        if trainer is not None and trainer.strategy.root_device.type == "cuda":
            if sum(s.nbytes for s in self.splits.values()) <= self.hparams.gpu_memory_budget_gb * 2**30:
                device = trainer.strategy.root_device
        for name, split in self.splits.items():
            x, y = (a if a.flags.writeable else a.copy() for a in split.arrays())
            self.tensors[name] = (torch.from_numpy(np.ascontiguousarray(x)).to(device),
                                  torch.from_numpy(y).to(device))

    def _loader(self, split: str, train: bool):
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        n = len(self.splits[split])
        sampler = EpochSampler(n, shuffle=train, seed=self.hparams.seed, rank=rank,
                               world_size=world,
                               block_rows=block_rows(self.splits[split]) if self.streaming else 0)
        if train and trainer is not None:
            # Resuming mid-epoch: the same epoch's permutation, minus the batches the
            # restored loop has already trained on (read when iteration starts).
            sampler.resume_skip = lambda: (
                trainer.fit_loop.epoch_loop.batch_progress.current.completed
                if trainer.training else 0)
        bs = self.hparams.batch_size if train else self.hparams.eval_batch_size
        drop_last = train and len(sampler) > bs
        if self.streaming:
            return streaming_loader(self.splits[split], bs, sampler, drop_last,
                                    self.hparams.num_workers)
        return InMemoryLoader(*self.tensors[split], bs, sampler, drop_last)

    def train_dataloader(self):
        return self._loader("train", train=True)

    def val_dataloader(self):
        return self._loader("val", train=False)

    def test_dataloader(self):
        return self._loader("test", train=False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Augment training batches on the device they now live on, deterministically per
        (seed, epoch, step), so a resumed run sees the same augmentations."""
        hp, trainer = self.hparams, self.trainer
        if not (trainer and trainer.training) or not self.dataset.input_spec.image:
            return batch
        if not (hp.crop_padding or hp.hflip):
            return batch
        x, y = batch
        gen = torch.Generator(device=x.device)
        gen.manual_seed(augmentation_seed(hp.seed, trainer.current_epoch, trainer.global_step,
                                          trainer.global_rank))
        return augment_batch(x, gen, hp.crop_padding, hp.hflip), y
