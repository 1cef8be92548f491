"""Architectures, schedules and training options, each trained briefly and exported."""

from __future__ import annotations

import re

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import nn

from export.errors import InputError
from tests.helpers import TrainingProbe
from trainer.data.datamodule import FixedDataModule
from trainer.freeze import export_checkpoint, held_out
from trainer.models import build_backbone
from trainer.module import ClassifierModule, cosine_with_warmup


def _fit_and_export(tmp_path, steps=3, callbacks=(), precision="32-true", **model_args):
    """`steps=None`: one whole epoch, with validation."""
    dm = FixedDataModule(batch_size=32)
    model = ClassifierModule(data_info=dm.info, **model_args)
    trainer = L.Trainer(max_steps=steps or -1, max_epochs=1, limit_val_batches=1, logger=False,
                        enable_checkpointing=any(hasattr(c, "dirpath") for c in callbacks),
                        enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False,
                        precision=precision, callbacks=list(callbacks))
    trainer.fit(model, dm)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    # a few steps can leave a net at chance, which the baseline gate refuses (tested in
    # test_retraining.py): these tests are of training and the graph's parity
    return export_checkpoint(tmp_path / "m.ckpt", tmp_path / "m.onnx", data=held_out(dm),
                             allow_trivial=True)


@pytest.mark.parametrize("arch", ["mlp", "convnet", "resnet9", "torchvision.resnet18"])
def test_every_architecture_trains_and_exports(tmp_path, arch):
    card = _fit_and_export(tmp_path, arch=arch, width=16)
    assert card.parity.max_abs_diff <= 1e-3


def test_torchvision_model_adapts_channels_and_classes():
    net = build_backbone("torchvision.mobilenet_v3_small", [1, 28, 28], 7)
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 7)
    with pytest.raises(InputError, match="torchvision has no model 'nosuchnet'"):
        build_backbone("torchvision.nosuchnet", [3, 32, 32], 10)
    with pytest.raises(InputError, match="convnet needs image input"):
        build_backbone("convnet", [13], 3)



@pytest.mark.parametrize("arch,shape,side", [("convnet", [1, 1, 1], 4), ("convnet", [3, 64, 2], 4),
                                             ("resnet9", [3, 4, 4], 8),
                                             ("torchvision.vgg11", [3, 16, 16], 32)])
def test_images_too_small_for_an_architecture_are_named(arch, shape, side):
    """Their pools made a 0x0 map: torch's 'Output size is too small' at the first step."""
    with pytest.raises(InputError, match=rf"model.arch: {arch} cannot take {shape[1]}x{shape[2]} "
                                         r"images \(.*too small\); resize them with"):
        build_backbone(arch, shape, 3)
    for ok in ([3, side, side], [1, side, 3 * side]):  # the smallest it takes runs
        build_backbone(arch, ok, 3).train()(torch.zeros(2, *ok))
    build_backbone("stridenet", shape, 3).train()(torch.zeros(2, *shape))  # no pools: any size



def test_a_width_beyond_the_machines_memory_is_named():
    """torch's allocator refused 720 GB of weights with a RuntimeError traceback. (convnet's
    first layer takes 36 MB at this width; its second asks for 72 TB and fails at once.)"""
    with pytest.raises(InputError, match=r"model.width 1000000: convnet's weights need more "
                                         r"memory than this machine can give"):
        build_backbone("convnet", [1, 8, 8], 3, width=10 ** 6)

def test_a_training_batch_of_one_row_is_named(tmp_path, capfd):
    """Batch normalisation cannot train on one row: torch's ValueError was a traceback."""
    from tests.conftest import ROOT, cli_in_process

    rc, err = cli_in_process(["fit", "--config", str(ROOT / "configs" / "digits.yaml"),
                              "--model.arch", "mlp", "--data.batch_size", "1",
                              "--trainer.max_epochs", "1"], tmp_path, capfd)
    assert rc == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].endswith(
        "a training batch of 1 row: the model's batch normalisation needs 2 or more "
        "(--data.batch_size, or more training rows)"), err

def test_backbone_weights_from_a_local_file(tmp_path):
    source = build_backbone("torchvision.resnet18", [1, 8, 8], 10)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    dm = FixedDataModule(batch_size=32)
    model = ClassifierModule(arch="torchvision.resnet18", data_info=dm.info,
                             backbone_weights=str(tmp_path / "resnet18.pth"), lr=1e-9)
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)
    trainer.fit(model, dm)
    w = model.net[1].conv1.weight.detach()
    assert torch.allclose(w, source.conv1.weight, atol=1e-6)  # copied, then a tiny step


@pytest.mark.parametrize("content,needle", [
    (lambda: torch.zeros(3), "found a Tensor"),
    (lambda: {"conv1.weight": 3}, "found 'conv1.weight': int"),
    (lambda: {"state_dict": [1, 2]}, "found a list"),
    (lambda: {"conv1.weight": torch.zeros(2, 2)}, "none of its weights has the name and shape"),
    (lambda: nn.Linear(3, 2).state_dict(), "none of its weights has the name and shape"),
])
def test_backbone_weights_that_fit_nothing_are_one_line(tmp_path, content, needle):
    """A weights file of another network trained from scratch as if its weights were used;
    a tensor or a dict of other values was an AttributeError traceback."""
    torch.save(content(), tmp_path / "w.pth")
    dm = FixedDataModule(batch_size=32)
    model = ClassifierModule(arch="torchvision.resnet18", data_info=dm.info,
                             backbone_weights=str(tmp_path / "w.pth"))
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)
    with pytest.raises(InputError, match=f"--model.backbone_weights {tmp_path}/w.pth: .*"
                                         f"{re.escape(needle)}"):
        trainer.fit(model, dm)
    assert trainer.global_step == 0


def test_cosine_with_warmup_shape():
    lrs = [cosine_with_warmup(s, 10, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # decays monotonically
    assert lrs[-1] < 0.01


@pytest.mark.parametrize("options, ran", [
    ({"optimizer": "sgd", "schedule": "cosine", "label_smoothing": 0.1, "channels_last": False},
     {"optimizer": "SGD", "scheduler": "LambdaLR", "label_smoothing": 0.1, "layout": {False}}),
    ({"channels_last": True},
     {"optimizer": "AdamW", "scheduler": "OneCycleLR", "label_smoothing": 0.0, "layout": {True}}),
])
def test_training_options(tmp_path, options, ran):
    probe = TrainingProbe()
    card = _fit_and_export(tmp_path, steps=6, callbacks=[probe], lr=0.01, **options)
    assert probe.optimizer == ran["optimizer"] and probe.scheduler == ran["scheduler"]
    assert probe.label_smoothing == ran["label_smoothing"]
    assert probe.channels_last == ran["layout"]  # the layout the convolutions were given
    peak = probe.lrs.index(max(probe.lrs))
    if options.get("schedule") == "cosine":  # (no warm-up step in 6) cosine decay from the top
        assert peak == 0 and all(a > b for a, b in zip(probe.lrs, probe.lrs[1:]))
        assert probe.lrs[-1] < 0.2 * probe.lrs[0]
    else:  # OneCycle starts at lr / 25 and rises
        assert probe.lrs[0] == pytest.approx(0.01 / 25) and peak > 0
    assert card.training.model.schedule == options.get("schedule", "onecycle")
    assert card.parity.max_abs_diff <= 1e-3  # the option changes training, not the graph


def test_channels_last_auto_is_timed_recorded_and_used():
    from trainer.hardware import AutoTrainer, choose

    dm = FixedDataModule(batch_size=32)
    probe = TrainingProbe()
    trainer = AutoTrainer(accelerator="cpu", precision="32-true", max_steps=2, max_epochs=1,
                          limit_val_batches=0, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, callbacks=[probe])
    trainer.fit(ClassifierModule(data_info=dm.info, arch="convnet", width=8), dm)
    assert "NHWC at" in trainer.hardware.layout_reason  # a measured choice, with its ratio
    assert probe.channels_last == {trainer.hardware.channels_last}  # and the one trained in
    with torch.device("meta"):  # Lightning's configure_model runs under the fit's device
        assert trainer.lightning_module.example_input(dm).device.type == "cpu"
    mlp = ClassifierModule(data_info=dm.info, arch="mlp")
    record = choose("cpu", mlp.net, mlp.example_input(dm), "32-true")
    assert record.channels_last is False and record.layout_reason == "no 2-D convolutions"
    assert record.step_ms is None  # nothing to time


def test_the_layout_check_is_remembered_per_machine_and_net(tmp_path, monkeypatch):
    from trainer.hardware import CHECKS, choose

    monkeypatch.setenv("FROZENFIT_CACHE", str(tmp_path))
    dm = FixedDataModule(batch_size=32)
    net8 = ClassifierModule(data_info=dm.info, arch="convnet", width=8)
    first = choose("cpu", net8.net, net8.example_input(dm), "32-true")
    assert "NHWC at" in first.layout_reason and "remembered" not in first.layout_reason
    again = choose("cpu", net8.net, net8.example_input(dm), "32-true")
    assert again.layout_reason == first.layout_reason + f" (remembered from an earlier run: {CHECKS})"
    assert again.step_ms == first.step_ms and again.channels_last == first.channels_last
    net16 = ClassifierModule(data_info=dm.info, arch="convnet", width=16)  # another net
    assert "remembered" not in choose("cpu", net16.net, net16.example_input(dm),
                                      "32-true").layout_reason
    (tmp_path / CHECKS).write_text('{"x": [1, 2]')  # damaged: checked again, then rewritten
    assert "remembered" not in choose("cpu", net8.net, net8.example_input(dm),
                                      "32-true").layout_reason
    assert "remembered" in choose("cpu", net8.net, net8.example_input(dm),
                                  "32-true").layout_reason


def test_ema_weights_are_what_gets_exported(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    saver = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=5, monitor=None)
    _fit_and_export(tmp_path, steps=5, callbacks=[EMAWeightAveraging(decay=0.9), saver])
    path = next((tmp_path / "ck").glob("*.ckpt"))
    ckpt = torch.load(path, weights_only=True)
    raw, ema = ckpt["current_model_state"], ckpt["state_dict"]  # Lightning keeps both
    assert not torch.equal(raw["net.1.0.weight"], ema["net.1.0.weight"])
    dm = FixedDataModule(batch_size=32)
    export_checkpoint(path, tmp_path / "ema.onnx", data=held_out(dm), allow_trivial=True)
    module = ClassifierModule(data_info=dm.info)
    module.load_state_dict(ema)
    x = dm.splits["test"].arrays(8)[0]
    import onnxruntime as ort

    got = ort.InferenceSession(str(tmp_path / "ema.onnx")).run(["logits"], {"image": x})[0]
    with torch.no_grad():
        want = module.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)  # the graph holds the EMA weights


@pytest.mark.parametrize("precision, dtype", [("bf16-mixed", torch.bfloat16),
                                              ("32-true", torch.float32)])
def test_precision_is_what_the_layers_compute_in(tmp_path, precision, dtype):
    probe = TrainingProbe()
    card = _fit_and_export(tmp_path, steps=None, callbacks=[probe], precision=precision)
    assert probe.dtypes == {dtype}  # every convolution and linear layer ran in it
    assert np.isfinite(card.metrics["val/loss"])
    assert card.parity.max_abs_diff <= 1e-3  # the graph is fp32 whatever trained it


@pytest.mark.slow
def test_torch_compile(tmp_path):
    card = _fit_and_export(tmp_path, steps=4, compile=True)
    assert card.parity.max_abs_diff <= 1e-3


def test_the_data_info_record_travels_as_json_and_reads_back_equal():
    import json

    from trainer.data.info import DataInfo

    dm = FixedDataModule(batch_size=32)
    info = dm.info
    assert isinstance(info, DataInfo) and info.outputs == 10 and not info.regression
    module = ClassifierModule(data_info=info)
    saved = module.hparams.data_info  # what a checkpoint keeps: plain JSON, no objects
    assert json.loads(json.dumps(saved)) == saved
    assert module.data == info and ClassifierModule(data_info=saved).data == info
    assert module.data.dataset.fingerprint == dm.dataset.fingerprint
    bad = {**saved, "input": {**saved["input"], "shape": [1, 0, 8]}}
    with pytest.raises(InputError, match=r"data_info\.input\.shape.*positive sizes"):
        ClassifierModule(data_info=bad)
