"""GPU checks; skipped without CUDA. Run on a GPU machine: ./scripts/test.sh -m cuda"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from export.card import read_card
from tests.conftest import ROOT, run_cli
from tests.helpers import TrainingProbe
from trainer.data.datamodule import FixedDataModule
from trainer.hardware import AutoTrainer
from trainer.module import ClassifierModule

pytestmark = pytest.mark.cuda


def _fit(precision="auto", epochs=2, **data):
    dm = FixedDataModule(batch_size=64, **data)
    model = ClassifierModule(data_info=dm.info)
    probe = TrainingProbe()
    trainer = AutoTrainer(accelerator="gpu", devices=1, max_epochs=epochs, logger=False,
                          precision=precision, enable_checkpointing=False,
                          enable_progress_bar=False, use_distributed_sampler=False,
                          callbacks=[probe])
    trainer.fit(model, dm)
    return trainer, dm, probe


def test_dataset_lives_on_the_gpu_and_augments_there():
    trainer, dm, probe = _fit(precision="32-true", crop_padding=1, hflip=True)
    assert all(x.is_cuda and y.is_cuda for x, y in dm.tensors.values())
    assert probe.device == "cuda" and probe.dtypes == {torch.float32}
    assert trainer.callback_metrics["val/acc"] > 0.8


@pytest.mark.parametrize("precision, dtype", [("bf16-mixed", torch.bfloat16),
                                              ("16-mixed", torch.float16)])
def test_mixed_precision_is_what_the_layers_compute_in(precision, dtype):
    trainer, _, probe = _fit(precision=precision)
    assert probe.dtypes == {dtype}
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    assert trainer.callback_metrics["val/acc"] > 0.8


def test_precision_auto_follows_the_compute_capability():
    trainer, _, probe = _fit()
    major, _ = torch.cuda.get_device_capability()
    want = ("bf16-mixed", torch.bfloat16) if major >= 8 else ("16-mixed", torch.float16)
    assert trainer.hardware.precision == want[0]
    assert probe.dtypes == {want[1]}
    assert "a quick check ran NHWC at" in trainer.hardware.layout_reason  # timed on the GPU
    assert probe.channels_last == {trainer.hardware.channels_last}
    assert torch.cuda.get_device_name() in trainer.hardware.device


def test_a_gpu_fit_freezes_a_graph_that_scores_the_same_on_the_cpu(tmp_path, digits_test_npz):
    proc = run_cli("fit", "--config", str(ROOT / "configs" / "digits.yaml"),
                   "--trainer.accelerator", "gpu", "--trainer.max_epochs", "6",
                   "--trainer.enable_progress_bar", "false",
                   "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = next((tmp_path / "runs" / "digits").glob("version_*"))
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["hardware"]["device"].startswith("CUDA ")
    card = read_card(run / "model.onnx")
    assert card.parity.max_abs_diff <= 1e-3  # exported in fp32 on the CPU
    # The torch test ran under bf16 autocast on the GPU, the graph in fp32: a row may flip.
    assert card.metrics["test/acc_onnx"] == pytest.approx(summary["test"]["test/acc"],
                                                             abs=2 / 269)
    preds = tmp_path / "preds.csv"
    proc = run_cli("predict", "--model", str(run / "model.onnx"), "--input",
                   str(digits_test_npz), "--output", str(preds), "--provider", "cpu")
    assert proc.returncode == 0, proc.stderr
    labels = np.loadtxt(preds, delimiter=",", skiprows=1, usecols=1, dtype=int)
    y = np.load(digits_test_npz)["y"]
    assert (labels == y).mean() == pytest.approx(card.metrics["test/acc_onnx"], abs=1e-6)
    assert card.metrics["test/acc_onnx"] >= 0.95
    import onnxruntime as ort

    from export.runtime import Predictor

    if "CUDAExecutionProvider" in ort.get_available_providers():  # onnxruntime-gpu installed
        # float32 on CUDA as on the CPU: onnxruntime's default TF32 moved confidences by 5e-4
        x = np.load(digits_test_npz)["x"]
        on_gpu = Predictor(run / "model.onnx", "cuda")
        assert on_gpu.provider == "CUDAExecutionProvider"
        np.testing.assert_allclose(on_gpu.predict(x).probabilities,
                                   Predictor(run / "model.onnx", "cpu").predict(x).probabilities,
                                   atol=1e-5)
