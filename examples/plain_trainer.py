"""Train with your own `lightning.Trainer` and get the same gated ONNX model `trainer fit`
writes: the product's DataModule and module compose with any Trainer, and `ExportOnnx`
exports from whatever the run saved (here Lightning's default checkpoint).

    python examples/plain_trainer.py [OUT_DIR]
"""

import os
import sys

import lightning as L

from export.runtime import Predictor
from trainer.callbacks import ExportOnnx
from trainer.data.datamodule import FixedDataModule
from trainer.module import ClassifierModule

out = sys.argv[1] if len(sys.argv) > 1 else "plain_trainer_out"
if os.path.exists(out) and not os.path.isdir(out):
    print(f"plain_trainer.py: error: {out}: expected a folder for the run, this is a file",
          file=sys.stderr)
    sys.exit(2)
L.seed_everything(0)
data = FixedDataModule(source="digits")
model = ClassifierModule(arch="convnet", width=16)  # learns its input and classes from `data`
export = ExportOnnx()
trainer = L.Trainer(max_epochs=4, accelerator="cpu", default_root_dir=out, callbacks=[export],
                    enable_progress_bar=False, logger=False)
trainer.fit(model, data)

graph = Predictor(export.path)  # onnxruntime only, as a deployment loads it
x, y = data.splits["test"].arrays()
accuracy = (graph.predict(x).labels == y).mean()
print(f"exported {export.path}: test accuracy {accuracy:.4f}, "
      f"parity {graph.card.parity.max_abs_diff:.1e}")
