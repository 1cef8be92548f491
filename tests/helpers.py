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
    `arrays` fixture stores each row's index there), and a hash of the final weights."""

    def __init__(self, out_dir: str):
        self.out_dir, self.seen = Path(out_dir), {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        rows = batch[0][:, 0].round().long().tolist()
        self.seen.setdefault(trainer.current_epoch, []).extend(rows)

    def on_train_end(self, trainer, pl_module) -> None:
        import hashlib

        self.out_dir.mkdir(parents=True, exist_ok=True)
        weights = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes()
                                          for p in pl_module.parameters())).hexdigest()
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(
            json.dumps({"rows": self.seen, "weights": weights}))


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


class TrainingProbe(L.Callback):
    """Record what training really ran with, for tests that assert an option took effect:
    the dtypes the convolutions and linear layers computed in, the memory layout of the
    images that reached the first layer, the optimizer and scheduler classes, the loss's
    label smoothing and the learning rate at every step."""

    def __init__(self):
        self.dtypes, self.channels_last, self.lrs, self.handles = set(), set(), [], []
        self.optimizer = self.scheduler = self.label_smoothing = self.device = None

    def on_train_start(self, trainer, pl_module) -> None:
        import torch

        def record(module, args, output):
            if module.training and torch.is_tensor(output):
                self.dtypes.add(output.dtype)
                x = args[0] if args else None
                if torch.is_tensor(x) and x.ndim == 4 and x.shape[1] > 1:  # 1 channel: both
                    self.channels_last.add(x.is_contiguous(memory_format=torch.channels_last)
                                           and not x.is_contiguous())
        layers = [m for m in pl_module.net.modules()
                  if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        self.handles = [m.register_forward_hook(record) for m in layers]
        self.optimizer = type(trainer.optimizers[0]).__name__
        self.scheduler = type(trainer.lr_scheduler_configs[0].scheduler).__name__
        self.label_smoothing = pl_module.loss.label_smoothing
        self.device = next(pl_module.parameters()).device.type

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_end(self, trainer, pl_module) -> None:
        for h in self.handles:
            h.remove()


def looping_model(digits_run, path: Path, trips: int = 10 ** 12) -> None:
    """The digits model's card on a graph that loops `trips` times per call (by default
    for a very long time)."""
    import onnx
    from onnx import TensorProto, helper

    card = next(p for p in onnx.load(str(digits_run / "model.onnx")).metadata_props
                if p.key == "frozenfit.card")
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["v_in", "one"], ["v_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None)],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [0.0])])
    graph = helper.make_graph([
        helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["f", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["start"]),
        helper.make_node("Loop", ["trips", "yes", "start"], ["logits"], body=body),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)], "hung",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 64]),
         helper.make_tensor("w", TensorProto.FLOAT, [64, 10], [0.01] * 640),
         helper.make_tensor("trips", TensorProto.INT64, [], [trips]),
         helper.make_tensor("yes", TensorProto.BOOL, [], [True])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    model.metadata_props.add(key=card.key, value=card.value)
    onnx.save(model, str(path))
