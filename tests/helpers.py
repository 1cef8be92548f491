"""Callbacks the tests plug into `trainer fit` through the CLI (--trainer.callbacks+=...)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import lightning as L


class SignalAtStep(L.Callback):
    """Send `signal` to this process after training step `step`: a deterministic
    interruption for resume tests."""

    def __init__(self, step: int, signal_name: str = "SIGTERM"):
        self.step, self.signal_name = step, signal_name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, self.signal_name))


class RecordRows(L.Callback):
    """Write, per rank and epoch, the first feature of every training row it saw (the
    `arrays` fixture stores each row's index there)."""

    def __init__(self, out_dir: str):
        self.out_dir, self.seen = Path(out_dir), {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        rows = batch[0][:, 0].round().long().tolist()
        self.seen.setdefault(trainer.current_epoch, []).extend(rows)

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.seen))


class PoisonLoss(L.Callback):
    """Make the weights non-finite after `step` steps, so the next loss is NaN."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            for p in pl_module.parameters():
                p.data.fill_(float("nan"))


class SignalAtHook(L.Callback):
    """Send SIGTERM to this process when Lightning calls `hook` (e.g. on_fit_end, just
    before the ONNX export; on_test_start, during the final test)."""

    def __init__(self, hook: str):
        self.hook = hook
        setattr(self, hook, self._fire)

    def _fire(self, *args, **kwargs) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
