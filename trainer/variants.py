"""Deployment variants of a float32 ONNX graph: fp16 weights for GPUs, and static INT8 (QDQ)
quantization calibrated on training samples, made by the export (trainer/freeze.py) and gated
there. numpy + onnx + onnxruntime only."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Weights and activations in float16; the input (uint8 or float32) and the outputs keep
    their types, so callers see no difference."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True)


class _Calibration:
    """onnxruntime.quantization.CalibrationDataReader over an array of inputs."""

    def __init__(self, name: str, x: np.ndarray, batch_size: int = 64):
        self.batches = iter([{name: x[i:i + batch_size]} for i in range(0, len(x), batch_size)])

    def get_next(self):
        return next(self.batches, None)


def to_int8(model: onnx.ModelProto, calibration: np.ndarray) -> onnx.ModelProto:
    """Static QDQ quantization (int8 weights per channel, int8 activations), with activation
    ranges calibrated on `calibration` inputs."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = model.graph.input[0].name
    with tempfile.TemporaryDirectory() as tmp:
        src, pre, dst = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(model, str(src))
        cwd = os.getcwd()
        os.chdir(tmp)  # onnxruntime's shape inference drops a debug model in the working
        try:           # folder when it gives up: the user's folder is not the place for it
            # ONNX's own shape inference is enough for these graphs (static but for the
            # batch); onnxruntime's symbolic one gave up on them before 1.23 and failed the
            # export (scripts/check_floors.sh).
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        finally:
            os.chdir(cwd)
        quantize_static(str(pre), str(dst), _Calibration(name, calibration),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        return onnx.load(str(dst))
