"""Deployment side, torch-free: serve a frozen ONNX graph with numpy + onnxruntime (runtime,
batch, serve, ray_engine, drift, card), and the small helpers the training side shares
(errors, atomic, timing, imaging, readers). Imports go one way: trainer -> export; the
exporter that freezes a checkpoint is trainer/freeze.py."""
