"""Callbacks that plug into the Lightning Trainer."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


class ExportOnnx(L.Callback):
    """At the end of fit, export the best checkpoint to `<run dir>/<filename>`, through the
    same parity-gated path as `trainer export`, using the run's held-out test samples."""

    def __init__(self, enabled: bool = True, filename: str = "model.onnx",
                 atol: float = 1e-3, opset: int = 18):
        """
        Args:
            enabled: Export at the end of fit.
            filename: File name inside the run folder.
            atol: Parity tolerance: max |logit difference| between onnxruntime and torch.
            opset: ONNX opset version.
        """
        self.enabled, self.filename, self.atol, self.opset = enabled, filename, atol, opset
        self.path: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or not trainer.is_global_zero or trainer.interrupted:
            return
        from export.to_onnx import export_checkpoint, held_out

        ranked = [cb for cb in trainer.checkpoint_callbacks if getattr(cb, "monitor", None)]
        paths = [cb.best_model_path for cb in ranked] + \
                [cb.last_model_path for cb in trainer.checkpoint_callbacks]
        ckpt = next((p for p in paths if p), "")
        if not ckpt:
            rank_zero_info("ExportOnnx: no checkpoint was saved; skipping the export")
            return
        self.path = Path(trainer.log_dir or ".") / self.filename
        card = export_checkpoint(ckpt, self.path, data=held_out(trainer.datamodule),
                                 opset=self.opset, atol=self.atol)
        parity = card["parity"]
        rank_zero_info(f"Exported {self.path} from {Path(ckpt).name} "
                       f"(parity: max |diff| {parity['max_abs_diff']:.1e}, "
                       f"top-1 agreement {parity['top1_agreement']:.4f})")
