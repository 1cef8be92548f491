"""Deployment side: freeze a checkpoint to ONNX (to_onnx, the only torch user) and serve it
with numpy + onnxruntime (runtime, batch, drift, card)."""
