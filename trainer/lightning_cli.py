"""The LightningCLI behind `trainer fit/validate/test`: the module, the DataModule, the
always-present callbacks as config groups, and the product's defaults. Imports torch and
Lightning, so `trainer/cli.py` loads it only for those commands."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

from export.errors import InputError


def _previous_last(trainer) -> str:
    """`--ckpt_path last` means the newest last.ckpt of this run name: each fit writes a new
    version_<n> folder, where Lightning alone would only look in the new, empty one."""
    logger = trainer.logger
    root = Path(logger.root_dir) if logger is not None else Path(trainer.default_root_dir)
    found = sorted(root.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise InputError(f"--ckpt_path last: no last.ckpt under {root}/version_*/checkpoints")
    print(f"resuming from {found[-1]}", file=sys.stderr)
    return str(found[-1])


def tune_cpu_allocator() -> None:
    """Keep freed activation buffers in glibc's heap instead of returning them to the OS.

    By default glibc serves blocks above 128 KiB-32 MiB with fresh mmaps and trims the heap
    eagerly, so every training step page-faults its activations in again. Raising both
    thresholds made MNIST convnet steps on 2 cores ~20% faster and removed the gap between
    Lightning and a hand-written loop (scripts/bench_train.py). No-op without glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: its maximum, 32 MiB
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        pass


def build_cli(args: list[str], run: bool = True, instantiate: bool = True):
    """The LightningCLI over ClassifierModule + FixedDataModule with the product's defaults.
    `instantiate=False` only parses and validates (`cli.config`), loading no data."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI

    from trainer.callbacks import CheckpointOnSigterm, ExportOnnx, NonFiniteGuard, RunReport
    from trainer.data.datamodule import FixedDataModule
    from trainer.module import ClassifierModule

    class TrainerCLI(LightningCLI):
        def add_arguments_to_parser(self, parser):
            # The model learns its input spec, classes and normalisation from the data.
            parser.link_arguments("data.info", "model.data_info", apply_on="instantiate")
            # Two checkpoint callbacks that are always there: the best by a monitored metric,
            # and last.ckpt rewritten every epoch (Lightning's save_last only follows top-k
            # saves, so it can lag behind the final epoch).
            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
            parser.set_defaults({
                "checkpoint.monitor": "val/loss", "checkpoint.mode": "min",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.filename": "best-epoch{epoch:03d}",
                "last_checkpoint.filename": "last", "last_checkpoint.monitor": None,
                "last_checkpoint.enable_version_counter": False,
            })
            parser.add_lightning_class_args(ExportOnnx, "export")
            parser.add_lightning_class_args(NonFiniteGuard, "nan_guard")
            parser.add_lightning_class_args(RunReport, "report")
            parser.add_lightning_class_args(CheckpointOnSigterm, "sigterm_checkpoint")

        def _parse_ckpt_path(self) -> None:
            # LightningCLI would overwrite the model config with the checkpoint's
            # hyperparameters, silently ignoring flags like --model.width. The config stays
            # authoritative; ClassifierModule.on_load_checkpoint refuses a mismatch instead.
            return

        def after_fit(self) -> None:
            report = next(cb for cb in self.trainer.callbacks if isinstance(cb, RunReport))
            if report.test_after_fit and not self.trainer.interrupted:
                best = [cb.best_model_path for cb in self.trainer.checkpoint_callbacks
                        if getattr(cb, "monitor", None) and cb.best_model_path]
                self.trainer.test(self.model, datamodule=self.datamodule,
                                  ckpt_path=best[0] if best else None, weights_only=True)
            report.write(self.trainer)

        def before_fit(self) -> None:
            config = self._secure_checkpoint_loading()
            if config.get("ckpt_path") == "last":
                config["ckpt_path"] = _previous_last(self.trainer)

        def before_validate(self) -> None:
            self._secure_checkpoint_loading()

        def before_test(self) -> None:
            self._secure_checkpoint_loading()

        def _secure_checkpoint_loading(self) -> dict:
            # Lightning unpickles checkpoints fully unless told otherwise; ours hold only
            # tensors and plain values, so nothing is lost by refusing pickled code.
            config = self.config_init[self.subcommand]
            if config.get("weights_only") is None:
                config["weights_only"] = True
            return config

        def instantiate_classes(self) -> None:
            if instantiate:
                super().instantiate_classes()

    # The seed is recorded in config.yaml; its log line would only clutter error output.
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        # `args` is how `trainer` hands its own argv to LightningCLI; that is intended.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return TrainerCLI(
            ClassifierModule, FixedDataModule, args=args, run=run,
            seed_everything_default=0,
            trainer_defaults={
                "max_epochs": 10,
                # The loaders shard each epoch per rank themselves (trainer/data/loader.py).
                "use_distributed_sampler": False,
                "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                           "init_args": {"save_dir": "runs", "name": "default"}},
            },
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"description": "Train on a fixed dataset (see `trainer --help`)."},
        )
