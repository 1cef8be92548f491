"""The LightningCLI behind `trainer fit/validate/test`: the module, the DataModule, the
always-present callbacks as config groups, and the product's defaults. Imports torch and
Lightning, so `trainer/cli.py` loads it only for those commands."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import yaml
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from export.card import HardwareChoice
from export.errors import InputError, check_options
from export.timing import usable_cores
from trainer import configyaml, phases, runs, tracking
from trainer.callbacks import (CheckpointOnSigterm, ExportOnnx, NonFiniteGuard, RunCheckpoint,
                               RunReport, check_export_options)
from trainer.data.datamodule import FixedDataModule, check_data_options
from trainer.hardware import AutoTrainer, choose, pinned_choice
from trainer.module import ClassifierModule, check_model_options
from trainer.stops import Preempted, stop_fit_on_sigterm


def _file_logger(config):
    """The init_args of the logger that writes into `<save_dir>/<name>/<version>` (CSV,
    TensorBoard), so its folder can be pointed at a run; None when there is none."""
    from trainer.tracking import split_loggers

    logger = split_loggers(config.trainer.logger)[0]
    return None if logger is None else logger.init_args


def _keep_run_folder(config) -> None:
    """A logger that writes no run folder (MLFlowLogger) is added after a CSVLogger that
    does: checkpoints, config.yaml, metrics.json and model.onnx stay in
    runs/<experiment name>/version_<n>/ and are copied to MLflow at the end of fit."""
    from jsonargparse import Namespace

    from trainer import tracking

    file_logger, others = tracking.split_loggers(config.trainer.logger)
    tracking.check_available(others)
    register = getattr(config.get("export"), "register_as", None)
    if register and not any(tracking.is_mlflow(x) for x in others):
        raise InputError(f"--export.register_as {register}: needs --trainer.logger "
                         "MLFlowLogger (the registry is MLflow's)")
    if others and file_logger is None:
        file_logger = Namespace(class_path="lightning.pytorch.loggers.CSVLogger",
                                init_args=Namespace(save_dir="runs",
                                                    name=tracking.run_name(others[0]),
                                                    version=None, prefix="",
                                                    flush_logs_every_n_steps=100))
    if others:
        config.trainer.logger = [file_logger, *others]


def _check_runs_outside_data(config) -> None:
    """Run folders written inside a folder that is listed as data (image folders, folders
    of tables): the next fit took `runs/` for a class and its plots for images, or read its
    metrics.csv as a table. Refused, naming both folders. A recursive glob (`data/**/*.csv`)
    lists its fixed folder as deep as a folder root is listed."""
    from export.tables import glob_base, is_table_glob
    from trainer.data.sources import LISTS_ROOT

    root = config.data.get("root")
    if config.data.get("source") not in LISTS_ROOT or not root:
        return
    folder = glob_base(root) if is_table_glob(root) and "**" in root else root
    if not os.path.isdir(folder):
        return
    file_logger, _ = tracking.split_loggers(config.trainer.logger)
    where, flag = (file_logger.init_args.save_dir, "--trainer.logger.save_dir") if file_logger \
        else (os.path.join(config.trainer.get("default_root_dir") or ".", "lightning_logs"),
              "--trainer.default_root_dir")
    data, runs = Path(folder).resolve(), Path(where).resolve()
    if runs == data or data in runs.parents:
        raise InputError(f"--data.root {root}: the run folders ({where}) would be written "
                         "inside it, and the next fit would read their plots and tables as "
                         f"data; set {flag} outside it, or run from another folder")


def _no_advertising(record: logging.LogRecord) -> bool:
    """Lightning tips for a cloud service on every run: not the user's business."""
    return "litlogger" not in record.getMessage()


def _report(trainer):
    from trainer.callbacks import RunReport

    return next(cb for cb in trainer.callbacks if isinstance(cb, RunReport))


def _bad_config(args: list[str], read=configyaml.load) -> str:
    """The config file among `args` (a flag's value: --config F, --model F.yaml, ...) that
    `read` (given its text) fails on: not UTF-8 text, or not a YAML a config may be; or
    --config when none of them can be named."""
    for arg in args:
        path = arg.split("=", 1)[-1]
        try:
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    read(f.read())
        except (UnicodeDecodeError, yaml.YAMLError):
            return path
        except OSError:
            continue
    return "--config"


GROUPS = ("trainer", "model", "data", "export", "checkpoint", "last_checkpoint", "report",
          "nan_guard", "sigterm_checkpoint")  # the config's groups of options


def _check_groups(config) -> None:
    """A group given a plain value in a config file (`trainer: 5`) reached the checks as
    that value: an AttributeError traceback."""
    from jsonargparse import Namespace

    for group in GROUPS:
        if (value := config.get(group)) is not None and not isinstance(value, Namespace):
            raise InputError(f"{group}: {value!r:.40} in a config; expected a mapping of its "
                             f"options ({group}: followed by indented option: value lines)")


def _check_trainer_options(trainer) -> None:
    """What Lightning takes unchecked and fails on mid-fit: a NaN clip (its
    MisconfigurationException), accumulating or validating every 0 (ZeroDivisionError), and
    weights in half precision fed the float32 the model normalises its input to; and what it
    takes but is never meant: no epoch or no batch to train (the export's gate then refused an
    untrained model, naming neither), a process a CPU device past 4 a core."""
    clip, every = trainer.get("gradient_clip_val"), trainer.get("check_val_every_n_epoch")
    accumulate, interval = trainer.get("accumulate_grad_batches", 1), \
        trainer.get("val_check_interval")
    precision = str(trainer.get("precision"))
    epochs, batches = trainer.get("max_epochs"), trainer.get("limit_train_batches")
    check_options(("trainer.max_epochs", epochs, epochs in (None, -1) or epochs >= 1,
                   ">= 1 (or -1: a run that ends at --trainer.max_steps or --trainer.max_time)"),
                  ("trainer.limit_train_batches", batches, batches is None or batches > 0,
                   "> 0 (0 trains nothing)"),
                  ("trainer.devices", trainer.get("devices"), _cpu_processes(trainer) <=
                   4 * usable_cores(), (f"at most {4 * usable_cores()} on CPU (a process "
                                        f"each, 4 per core of the {usable_cores()} this "
                                        "process may use)")),
                  ("trainer.gradient_clip_val", clip, clip is None or clip >= 0, ">= 0"),
                  ("trainer.accumulate_grad_batches", accumulate, accumulate >= 1, ">= 1"),
                  ("trainer.check_val_every_n_epoch", every, every is None or every >= 1,
                   ">= 1"),
                  ("trainer.val_check_interval", interval, not isinstance(interval, (int, float))
                   or interval > 0, "> 0"),
                  ("trainer.precision", precision, precision not in ("16-true", "bf16-true"),
                   ("32-true, 64-true, 16-mixed, bf16-mixed or auto (half-precision weights "
                    "would take the float32 the model normalises its input to)")))


def _cpu_processes(trainer) -> int:
    """The processes a fit on CPU starts for --trainer.devices N (1 on a GPU, or where
    Lightning chooses): --trainer.devices 100 on a 2-core machine started 100 processes of
    several hundred MB each."""
    import torch

    devices, accelerator = str(trainer.get("devices")), str(trainer.get("accelerator"))
    on_cpu = accelerator == "cpu" or accelerator == "auto" and not torch.cuda.is_available()
    return int(devices) if on_cpu and devices.isdigit() else 1


class TrainerCLI(LightningCLI):
    """LightningCLI with the product's rules; each hook hands its work to the module that
    owns it (run folders: runs.py, hardware: hardware.py, tracking: tracking.py)."""

    def __init__(self, *args, instantiate: bool = True, **kwargs):
        self._instantiate = instantiate
        super().__init__(*args, **kwargs)

    def parse_arguments(self, parser, args):
        from argparse import ArgumentError

        from trainer.option_errors import explain

        self._argv = list(args or [])
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as exc:
            if (problem := str(exc).partition("Problems parsing config: ")[2]):
                raise InputError(f"{_bad_config(args or [])}: not a YAML config: "
                                 f"{configyaml.problem(problem)}") from None
            sub = getattr(self, "_subcommand_parsers", {}).get(args[0]) if args else None
            raise InputError(explain(str(exc), list(args), sub or parser)) from None
        except UnicodeDecodeError as exc:  # jsonargparse reads a config file as UTF-8 text
            raise InputError(f"{_bad_config(args or [], str)}: not UTF-8 text ({exc.reason} at "
                             f"byte {exc.start}); expected a YAML config") from None

    def add_arguments_to_parser(self, parser):
        # The model learns its input spec, classes and normalisation from the data.
        parser.link_arguments("data.info", "model.data_info", apply_on="instantiate")
        # Two checkpoint callbacks that are always there: the best by a monitored metric,
        # and last.ckpt rewritten every epoch (Lightning's save_last only follows top-k
        # saves, so it can lag behind the final epoch).
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.add_lightning_class_args(RunCheckpoint, "last_checkpoint")
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
        # Private hook, overridden because Lightning offers no public switch: it would
        # overwrite the model config with the checkpoint's hyperparameters, silently
        # ignoring flags like --model.width. The config stays authoritative;
        # ClassifierModule.on_load_checkpoint refuses a mismatch instead. Pinned by
        # tests/test_resume.py::test_resume_refuses_other_data_and_other_architecture.
        return

    def before_instantiate_classes(self) -> None:
        """Check the options and resolve --ckpt_path before anything is built: `last` /
        `best` name the newest run of this run name; a resume continues in its own run
        folder; validate and test write into the checkpoint's run (`eval/`)."""
        _check_groups(self.config[self.subcommand] if self.subcommand else self.config)
        if self.subcommand is None:  # `trainer data`: parse only, nothing runs
            return
        if self.subcommand == "fit":
            stop_fit_on_sigterm()
        config = self.config[self.subcommand]
        check_data_options(**config.data)  # before any data is read
        check_model_options(**config.model)
        if config.get("export") is not None:
            check_export_options(config.export.filename, config.export.atol,
                                 config.export.opset)
        _check_trainer_options(config.trainer)
        _check_runs_outside_data(config)
        # Lightning unpickles checkpoints fully unless told otherwise; ours hold only
        # tensors and plain values. A config file cannot turn this off.
        config.weights_only = True
        _keep_run_folder(config)
        logger = _file_logger(config)
        root = Path(logger.save_dir or ".") / (logger.name or "") if logger else \
            Path(config.trainer.default_root_dir or ".")
        if config.model.init_from:  # refused now, not after the run has started
            runs.load_checkpoint(config.model.init_from, "--model.init_from", mmap=True)
        if config.ckpt_path is None:
            if self.subcommand != "fit":
                raise InputError(f"--ckpt_path is required: a checkpoint file, `last` or "
                                 f"`best` (of the newest run under {root}/)")
            runs.check_new_version(logger, root)
            return
        ckpt, state = runs.open_checkpoint(config.ckpt_path, root, self.subcommand)
        config.ckpt_path = str(ckpt)
        run = runs.run_folder(ckpt)
        if self.subcommand == "fit":
            runs.check_same_config(ckpt, yaml.safe_load(
                self.parser.dump(self.config, skip_none=False))[self.subcommand])
            self._pinned = pinned_choice(state.get("hardware"), config.trainer.precision,
                                         f"--ckpt_path {ckpt}")
            if logger and runs.in_run_folder(ckpt):
                runs.continue_in_run(logger, run, root)
            else:
                runs.check_new_version(logger, root)
        else:
            runs.take_run_data(config.data, run, self._argv, self.subcommand)
            if logger:
                logger.save_dir, logger.name = str(run.parent), run.name
                logger.version = runs.eval_version(run, self.subcommand, ckpt)

    def instantiate_trainer(self, **kwargs):
        with phases.timed("check"):
            settings = getattr(self, "_pinned", None) or self._hardware_for_model()
        if settings:  # config.yaml keeps `auto`; only this trainer gets the value
            kwargs["precision"] = settings.precision
            rank_zero_info(f"precision: {settings.precision} ({settings.device}: "
                           f"{settings.reason}); channels_last: {settings.channels_last} "
                           f"({settings.layout_reason or 'set by the configuration'})")
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError, TypeError) as exc:  # Lightning's checks of
            raise InputError(f"--trainer: {str(exc).splitlines()[0]}") from None  # its options
        if settings:
            trainer.hardware = settings
        return trainer

    def _hardware_for_model(self) -> HardwareChoice | None:
        """precision and channels_last `auto` chosen together for this model (a tiny
        net can run bf16 no faster than fp32 where a wide one runs it much faster)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand != "fit" or str(config.trainer.precision) != "auto":
            return None
        return choose(str(config.trainer.accelerator), self.model.net,
                      self.model.example_input(self.datamodule), "auto",
                      self.model.hparams.channels_last)

    def after_fit(self) -> None:
        if self.trainer.received_sigterm:  # it came during the export at fit's end
            raise Preempted()
        report = _report(self.trainer)
        if report.test_after_fit and not self.trainer.interrupted:
            # Test exactly the weights that are exported: the best checkpoint's
            # state_dict (the averaged weights under EMA). `ckpt_path=best` would let a
            # WeightAveraging callback load its un-averaged copy instead.
            best = [cb.best_model_path for cb in self.trainer.checkpoint_callbacks
                    if getattr(cb, "monitor", None) and cb.best_model_path]
            if best:
                self.model.load_state_dict(runs.load_checkpoint(best[0])["state_dict"])
            with phases.timed("test"):
                self.trainer.test(self.model, datamodule=self.datamodule)
        measured = phases.phases()
        report.write(self.trainer, measured)
        if self.trainer.is_global_zero:
            print(phases.line(measured), file=sys.stderr, flush=True)
        tracking.track_fit(self.trainer, self.datamodule)

    def before_fit(self) -> None:
        """Every logger gets the resolved config as its hyperparameters (the module's
        own hparams carry the dataset statistics, which are the card's business)."""
        params = tracking.flat_config(yaml.safe_load(self.parser.dump(
            self.config, skip_none=False))[self.subcommand])
        for logger in self.trainer.loggers:
            logger.log_hyperparams(params)

    def after_validate(self) -> None:
        _report(self.trainer).write_evaluation(self.trainer, "validate")

    def after_test(self) -> None:
        _report(self.trainer).write_evaluation(self.trainer, "test")

    def instantiate_classes(self) -> None:
        if self._instantiate:
            phases.mark("build")
            super().instantiate_classes()

    def build(self) -> None:
        """Build what a parse-only CLI (`instantiate=False`) left unbuilt: the data is read."""
        self._instantiate = True
        self.instantiate_classes()


def build_cli(args: list[str], run: bool = True, instantiate: bool = True) -> TrainerCLI:
    """The LightningCLI over ClassifierModule + FixedDataModule with the product's defaults.
    `instantiate=False` only parses and validates (`cli.config`), loading no data."""
    configyaml.guard_jsonargparse()
    # The seed is recorded in config.yaml; its log line would only clutter error output.
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    for handler in logging.getLogger("lightning.pytorch").handlers:
        handler.addFilter(_no_advertising)
    with warnings.catch_warnings():
        # `args` is how `trainer` hands its own argv to LightningCLI; that is intended.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        # A resume keeps the earlier log as metrics-part<k>.csv (trainer/runs.py) before
        # CSVLogger would delete it; its warning that it will be deleted is then untrue.
        warnings.filterwarnings("ignore", message="Experiment logs directory")
        # Under bf16 the summary's size column is an estimate; the run is not affected.
        warnings.filterwarnings("ignore",
                                message="Precision .* is not supported by the model summary")
        return TrainerCLI(
            ClassifierModule, FixedDataModule, trainer_class=AutoTrainer, args=args, run=run,
            instantiate=instantiate,
            seed_everything_default=0,
            trainer_defaults={
                "max_epochs": 10,
                # The loaders shard each epoch per rank themselves (trainer/data/loader.py).
                "use_distributed_sampler": False,
                "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                           "init_args": {"save_dir": "runs", "name": "default"}},
            },
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"description": "Train on a fixed dataset (see `trainer --help`).",
                           "exit_on_error": False, "allow_abbrev": False},
        )
