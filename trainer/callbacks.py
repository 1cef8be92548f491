"""Callbacks that plug into the Lightning Trainer."""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info

from export.errors import InputError, check_options


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint with epochs counted from 1 in file names, as the progress
    bar, metrics.json and the card count them: `best-epoch015.ckpt` holds the weights after
    the 15th epoch."""

    @property
    def state_key(self) -> str:  # as ModelCheckpoint's: runs saved before resume as they were
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)

    def format_checkpoint_name(self, metrics, filename=None, ver=None, prefix=None):
        if "epoch" in metrics:
            metrics = {**metrics, "epoch": metrics["epoch"] + 1}
        return super().format_checkpoint_name(metrics, filename, ver, prefix)


class EpochProgressBar(TQDMProgressBar):
    """Lightning's progress bar, counting epochs from 1 of max_epochs ("Epoch 3/10")."""

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        total = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch + 1}{total}")


MIN_OPSET = 13  # below, ONNX's version converter ends in an assertion on these graphs


def check_opset(opset: int, flag: str) -> None:
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise InputError(f"{flag} {opset}: expected {MIN_OPSET} to {newest} (this onnx)")


def check_export_options(filename: str, atol: float, opset: int) -> None:
    """--export.filename names a file in the run folder: a path (`../x.onnx`, `/etc/x`)
    wrote the model wherever it pointed, over any file there. --export.atol > 0 and
    --export.opset in range (NaN, a negative tolerance or opset 5 failed the export after
    the whole fit; an atol of inf turns the parity gate off)."""
    if not isinstance(filename, str) or Path(filename).name != filename or \
            not filename.endswith(".onnx"):
        raise InputError(f"--export.filename {filename!r}: expected a file name inside the run "
                         "folder ending in .onnx, such as model.onnx")
    check_options(("export.atol", atol, atol > 0, "> 0 (onnxruntime against torch)"))
    check_opset(opset, "--export.opset")


class ExportOnnx(L.Callback):
    """At the end of fit, export the best checkpoint to `<run dir>/<filename>`, through the
    same parity-gated path as `trainer export`, using the run's held-out test samples."""

    def __init__(self, enabled: bool = True, filename: str = "model.onnx",
                 atol: float = 1e-3, opset: int = 18, register_as: str | None = None,
                 allow_trivial: bool = False, calibrate: bool = True):
        """
        Args:
            enabled: Export at the end of fit.
            filename: File name inside the run folder.
            atol: Parity tolerance: max |logit difference| between onnxruntime and torch.
            opset: ONNX opset version.
            register_as: Register the exported model under this name in the MLflow Model
                Registry (needs --trainer.logger MLFlowLogger).
            allow_trivial: Export even a model no better than always giving the validation
                split's most common answer (refused by default, in one line).
            calibrate: Fit a temperature for a classifier's probabilities on half of the
                validation rows (the conformal scores for prediction sets are stored either
                way); writes calibration.png, the reliability diagram, beside the model.
        """
        check_export_options(filename, atol, opset)
        self.enabled, self.filename, self.atol, self.opset = enabled, filename, atol, opset
        self.register_as, self.allow_trivial = register_as, allow_trivial
        self.calibrate = calibrate
        self.path: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or trainer.interrupted:
            return
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective under DDP
        ckpt = self._checkpoint(trainer, Path(log_dir))
        if not trainer.is_global_zero:
            return
        from trainer.freeze import export_checkpoint, held_out

        from trainer import phases

        self.path = Path(log_dir) / self.filename
        given = (pl_module.hparams.get("backbone") or {}).get("object", False)
        with phases.timed("export"):  # a backbone object: a copy gets the checkpoint's weights
            card = export_checkpoint(ckpt, self.path, data=held_out(trainer.datamodule),
                                     opset=self.opset, atol=self.atol,
                                     allow_trivial=self.allow_trivial,
                                     calibrate_t=self.calibrate,
                                     backbone=copy.deepcopy(pl_module.net[1]).cpu() if given else None)
        parity = card.parity
        rank_zero_info(f"Exported {self.path} from {Path(ckpt).name} "
                       f"(parity: max |diff| {parity.max_abs_diff:.1e}, "
                       f"top-1 agreement {parity.top1_agreement:.4f})")
        if card.calibration is not None and card.calibration.reliability:
            from trainer.report import save_reliability

            save_reliability(card.calibration, Path(log_dir) / "calibration.png")


    @staticmethod
    def _checkpoint(trainer: L.Trainer, log_dir: Path) -> str:
        """What the run saved: the best monitored checkpoint, else the newest (last.ckpt, or
        an unmonitored ModelCheckpoint's latest, as Lightning's default one); when nothing
        was saved, the final weights are saved now (on every rank: a collective)."""
        ranked = [cb for cb in trainer.checkpoint_callbacks if getattr(cb, "monitor", None)]
        paths = [cb.best_model_path for cb in ranked] + \
                [cb.last_model_path for cb in trainer.checkpoint_callbacks] + \
                [cb.best_model_path for cb in trainer.checkpoint_callbacks]
        ckpt = next((p for p in paths if p), "")
        if not ckpt:
            ckpt = str(log_dir / "checkpoints" / "final.ckpt")
            trainer.save_checkpoint(ckpt, weights_only=False)
            rank_zero_info(f"ExportOnnx: the run saved no checkpoint; saved the final "
                           f"weights to {ckpt} and exporting those")
        return ckpt


def stepping_batches(trainer) -> int | float:
    """The optimizer steps of the whole fit (`estimated_stepping_batches`; math.inf for a run
    without an end: max_epochs and max_steps -1). Where the data is first known Lightning
    checks an integer `val_check_interval` against the epoch's batches: its ValueError (its
    message says what to set) is one line here."""
    try:
        steps = trainer.estimated_stepping_batches
        return steps if math.isinf(steps) else int(steps)
    except ValueError as exc:
        if "val_check_interval" not in str(exc):
            raise
        raise InputError(f"--trainer.val_check_interval: {' '.join(str(exc).split())}") \
            from None


def check_averaging_horizon(trainer) -> None:
    """An exponential moving average of the weights remembers ~1 / (1 - decay) updates; a
    run shorter than that exports weights close to their random start (decay 0.999 over a
    300-step digits run: 10% accuracy). Refused before the first step, naming both."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    steps = stepping_batches(trainer)
    for cb in trainer.callbacks:
        if not isinstance(cb, EMAWeightAveraging):
            continue
        # Lightning keeps no public decay: read it off the averaging function it built,
        # which maps (average 1, weights 0) to decay * 1 + (1 - decay) * 0
        fn = getattr(cb, "_kwargs", {}).get("avg_fn")
        decay = float(fn(torch.ones(()), torch.zeros(()), torch.tensor(1))) if fn else None
        every = max(1, int(getattr(cb, "update_every_n_steps", 1) or 1))
        first = cb.update_starting_at_step or 0
        if cb.update_starting_at_epoch and trainer.max_epochs and trainer.max_epochs > 0:
            first = max(first, steps * cb.update_starting_at_epoch // trainer.max_epochs)
        updates = max(0, steps - first) // every
        if decay is not None and 1 / (1 - decay) > updates / 2:
            raise InputError(
                f"EMAWeightAveraging: decay {decay:.4g} averages over ~{1 / (1 - decay):,.0f} "
                f"updates but this run makes {updates:,}; the average would stay near the "
                f"initial weights. Use decay <= {1 - 2 / max(updates, 2):.4f} or train longer")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the run stops without saving."""


class NonFiniteGuard(L.Callback):
    """Stop at the first non-finite training loss, naming the epoch and step. The exception
    ends fit before any checkpoint is written, so the last good checkpoint is kept.

    Reading the loss costs one host-device sync per checked step; `every_n_steps` spaces
    the checks on a GPU."""

    def __init__(self, every_n_steps: int = 1):
        self.every_n_steps = every_n_steps

    def on_fit_start(self, trainer, pl_module) -> None:
        check_averaging_horizon(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None or trainer.global_step % self.every_n_steps:
            return
        if not bool(loss.detach().isfinite()):
            saved = [cb.last_model_path for cb in trainer.checkpoint_callbacks
                     if getattr(cb, "last_model_path", "")]
            raise NonFiniteLossError(
                f"loss is {float(loss)} in epoch {trainer.current_epoch + 1}, step "
                f"{trainer.global_step - 1} (batch {batch_idx}); stopped without saving, the "
                f"last good checkpoint is kept: {saved[-1] if saved else 'none written yet'}")


class CheckpointOnSigterm(L.Callback):
    """On SIGTERM Lightning finishes the current batch and raises SIGTERMException; this
    writes `last.ckpt` (mid-epoch, with the loop's position) so `--ckpt_path last` resumes
    exactly. Other exceptions (a NaN loss, a crash) save nothing."""

    saved: Path | None = None  # the checkpoint written on the last stop, for the CLI's message

    def setup(self, trainer, pl_module, stage: str) -> None:
        CheckpointOnSigterm.saved = None  # not an earlier fit's (api.fit runs several)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not isinstance(exception, SIGTERMException):
            return
        for cb in trainer.checkpoint_callbacks:
            if getattr(cb, "monitor", None) is None and cb.dirpath:
                path = Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
                trainer.save_checkpoint(path, weights_only=False)
                CheckpointOnSigterm.saved = path
                rank_zero_info(f"SIGTERM: saved {path}; resume with --ckpt_path last")
                return


class RunReport(L.Callback):
    """What a run leaves behind besides checkpoints: throughput on the progress bar, and at
    the end `metrics.json` (best and final validation metrics, test metrics when the test
    split was evaluated, seconds per epoch, samples per second), `curves.png` and, after a
    test, `confusion_matrix.png`. The epoch history travels in checkpoints, so a resumed
    run's report describes the whole run, as an uninterrupted run's would. A fit that fails
    before its first epoch leaves no run folder behind."""

    def __init__(self, enabled: bool = True, test_after_fit: bool = True, plots: bool = True):
        """
        Args:
            enabled: Write metrics.json (and plots) into the run folder.
            test_after_fit: Evaluate the best checkpoint on the test split after fit.
            plots: Also write curves.png and confusion_matrix.png.
        """
        self.enabled, self.test_after_fit, self.plots = enabled, test_after_fit, plots
        self.epochs: list[dict] = []
        self.test: dict[str, float] = {}
        # The epoch in progress: seconds and samples before this process (a resume), and
        # since this process started it.
        self._epoch, self._carried, self._start, self._samples = -1, 0.0, 0.0, 0
        self._restored: dict | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Log at least once per epoch: Lightning's default interval (50 steps) is longer
        than a small dataset's epoch, and it warns about it on every such run."""
        splits = getattr(trainer.datamodule, "splits", None)
        if stage != "fit" or not splits or "train" not in splits:
            return
        per_rank = len(splits["train"]) // max(1, trainer.world_size)
        batches = max(1, per_rank // trainer.datamodule.hparams.batch_size)
        trainer.log_every_n_steps = min(trainer.log_every_n_steps, batches)

    def state_dict(self) -> dict:
        seconds = self._carried + (time.perf_counter() - self._start if self._start else 0.0)
        return {"epochs": self.epochs, "partial": {"epoch": self._epoch, "seconds": seconds,
                                                   "samples": self._samples}}

    def load_state_dict(self, state: dict) -> None:
        self.epochs = list(state.get("epochs", []))
        self._restored = state.get("partial")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Not on_train_epoch_start: Lightning skips it when a run resumes mid-epoch.
        if batch_idx == 0 or not self._start:
            self._begin_epoch(trainer)

    def _begin_epoch(self, trainer) -> None:
        part, self._restored = self._restored, None
        resumed = part is not None and part["epoch"] == trainer.current_epoch
        self._epoch = trainer.current_epoch
        self._carried = part["seconds"] if resumed else 0.0
        self._samples = part["samples"] if resumed else 0
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._samples += len(batch[1])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        seconds = self._carried + time.perf_counter() - self._start
        rate = self._samples * trainer.world_size / max(seconds, 1e-9)
        pl_module.log("train/samples_per_sec", rate, prog_bar=True, rank_zero_only=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        self.epochs.append({"epoch": trainer.current_epoch + 1, "seconds": seconds,
                            "samples_per_second": rate, **metrics})
        self._start = 0.0

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        log_dir = trainer.logger.log_dir if trainer.logger is not None else None
        if self.epochs or isinstance(exception, SIGTERMException) or not log_dir \
                or not trainer.is_global_zero or trainer.state.fn != "fit":
            return
        import atexit

        from trainer.runs import discard_unfinished

        # After Lightning's teardown, which still writes the loggers' files into the folder.
        atexit.register(discard_unfinished, Path(log_dir))

    def on_test_end(self, trainer, pl_module) -> None:
        self.test = {k: float(v) for k, v in trainer.callback_metrics.items()
                     if k.startswith("test/") and v.numel() == 1}
        confusion = getattr(pl_module, "test_confusion", None)
        if not (self.enabled and self.plots and confusion is not None):
            return
        # compute() and log_dir are collectives under DDP: every rank joins, rank 0 draws.
        matrix, log_dir = confusion.compute(), trainer.log_dir
        if trainer.is_global_zero:
            from trainer.report import save_confusion_matrix

            save_confusion_matrix(confusion, matrix, list(pl_module.data.class_names),
                                  Path(log_dir or ".") / "confusion_matrix.png")

    def on_train_start(self, trainer, pl_module) -> None:
        from trainer import phases

        phases.mark("train_start")

    def on_train_end(self, trainer, pl_module) -> None:
        from trainer import phases

        phases.mark("train_end")

    def write(self, trainer, phases: dict | None = None) -> Path | None:
        """metrics.json (with the fit's `phases`, in seconds) and curves.png; the CLI calls
        this after fit (and the test)."""
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if not self.enabled or not trainer.is_global_zero or not self.epochs:
            return None
        from trainer.report import save_curves, write_metrics

        folder = Path(log_dir or ".")
        ranked = [cb for cb in trainer.checkpoint_callbacks if getattr(cb, "monitor", None)]
        best = ranked[0] if ranked else None
        hardware = getattr(trainer, "hardware", None)
        path = write_metrics(folder / "metrics.json", self.epochs, self.test, best,
                             hardware.to_json() if hardware is not None else None, phases)
        if self.plots:
            save_curves(self.epochs, folder / "curves.png")
        return path

    def write_evaluation(self, trainer, stage: str) -> Path | None:
        """`trainer validate/test`: metrics.json of the evaluated checkpoint."""
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if not self.enabled or not trainer.is_global_zero:
            return None
        from trainer.report import write_evaluation

        prefix = "val/" if stage == "validate" else "test/"
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith(prefix) and v.numel() == 1}
        return write_evaluation(Path(log_dir or ".") / "metrics.json", stage, trainer.ckpt_path,
                                metrics)
