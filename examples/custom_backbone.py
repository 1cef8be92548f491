"""Train your own nn.Module with the product: the same normalisation, gates, card and
torch-free ONNX model as a built-in architecture.

    python examples/custom_backbone.py [OUT_DIR]
"""

import os
import sys

import lightning as L
from my_nets import SmallConv

from export.runtime import Predictor
from trainer.callbacks import ExportOnnx
from trainer.data.datamodule import FixedDataModule
from trainer.module import ClassifierModule

out = sys.argv[1] if len(sys.argv) > 1 else "custom_backbone_out"
if os.path.exists(out) and not os.path.isdir(out):
    print(f"custom_backbone.py: error: {out}: expected a folder for the run, this is a file",
          file=sys.stderr)
    sys.exit(2)
L.seed_everything(0)
data = FixedDataModule(source="digits")
model = ClassifierModule(backbone=SmallConv(classes=10, width=16), lr=5e-3)
export = ExportOnnx()
trainer = L.Trainer(max_epochs=6, accelerator="cpu", default_root_dir=out, callbacks=[export],
                    enable_progress_bar=False, logger=False)
trainer.fit(model, data)

graph = Predictor(export.path)  # onnxruntime only, as a deployment loads it
x, y = data.splits["test"].arrays()
accuracy = (graph.predict(x).labels == y).mean()
print(f"exported {export.path}: backbone {graph.card.training.model.network}, "
      f"test accuracy {accuracy:.4f}, parity {graph.card.parity.max_abs_diff:.1e}")
