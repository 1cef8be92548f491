"""GPU checks; skipped without CUDA. Run on a GPU machine: ./scripts/test.sh -m cuda"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from trainer.data.datamodule import FixedDataModule
from trainer.module import ClassifierModule

pytestmark = pytest.mark.cuda


def test_dataset_lives_on_the_gpu_and_augments_there():
    dm = FixedDataModule(batch_size=64, crop_padding=1, hflip=True)
    model = ClassifierModule(data_info=dm.info)
    trainer = L.Trainer(accelerator="gpu", devices=1, max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        use_distributed_sampler=False)
    trainer.fit(model, dm)
    assert all(x.is_cuda and y.is_cuda for x, y in dm.tensors.values())
    assert trainer.callback_metrics["val/acc"] > 0.8


def test_bf16_and_fp16_mixed_precision_train():
    for precision in ("bf16-mixed", "16-mixed"):
        dm = FixedDataModule(batch_size=64)
        model = ClassifierModule(data_info=dm.info)
        trainer = L.Trainer(accelerator="gpu", devices=1, max_epochs=2, logger=False,
                            precision=precision, enable_checkpointing=False,
                            enable_progress_bar=False, use_distributed_sampler=False)
        trainer.fit(model, dm)
        assert torch.isfinite(trainer.callback_metrics["val/loss"])
