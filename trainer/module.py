"""The LightningModule: normalisation + backbone, loss, torchmetrics, optimizer, schedule.

The only file of the training side that knows Lightning's module API. What the model knows
of its data arrives as `data_info` (a DataInfo, linked from the DataModule by the CLI) and
is saved in the checkpoint's hyperparameters as JSON, so a checkpoint alone exports."""

from __future__ import annotations

import math
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MeanAbsoluteError, MeanMetric, MeanSquaredError, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from export.errors import check_options
from trainer.data import lineage
from trainer.data.info import DataInfo
from trainer.models import build_backbone, custom, forward_checked
from trainer.models.nets import Normalize
from trainer.runs import check_same_rows, loadable_state


def check_model_options(*, width, dropout, lr, weight_decay, warmup_fraction,
                        label_smoothing, **_) -> None:
    """The ranges of the numeric options, checked by the CLI before any data is read and
    by the module itself when a script builds it."""
    check_options(("model.width", width, width >= 1, ">= 1"),
                  ("model.dropout", dropout, 0 <= dropout < 1, "in [0, 1)"),
                  ("model.lr", lr, 0 < lr < 3.4e38, "> 0 and a finite float32"),
                  ("model.weight_decay", weight_decay, 0 <= weight_decay < 3.4e38, ">= 0, finite"),
                  ("model.warmup_fraction", warmup_fraction, 0 <= warmup_fraction <= 1,
                   "in [0, 1]"),
                  ("model.label_smoothing", label_smoothing, 0 <= label_smoothing < 1,
                   "in [0, 1)"))


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear from 0 to 1 over `warmup` steps, then cosine down to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class ClassifierModule(L.LightningModule):
    def __init__(
        self,
        arch: str = "convnet",
        width: int = 32,
        dropout: float = 0.1,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 3e-3,
        weight_decay: float = 5e-4,
        schedule: Literal["onecycle", "cosine", "constant"] = "onecycle",
        warmup_fraction: float = 0.05,
        label_smoothing: float = 0.0,
        channels_last: bool | Literal["auto"] = "auto",
        compile: bool = False,
        init_from: str | None = None,
        backbone_weights: str | None = None,
        backbone: dict | nn.Module | None = None,
        data_info: DataInfo | dict | None = None,
    ):
        """
        Args:
            arch: Backbone: mlp (features or images), convnet (small images), resnet9
                (CIFAR-scale images), or torchvision.<name> for any torchvision classifier
                (e.g. torchvision.resnet18), randomly initialised.
            width: Base channel/hidden width of the backbone.
            dropout: Dropout before the classifier layer.
            optimizer: adamw, or sgd (momentum 0.9, Nesterov).
            lr: Peak learning rate.
            weight_decay: Decoupled weight decay (not applied to norms and biases).
            schedule: onecycle, cosine (linear warmup, then cosine decay to 0), or constant.
            warmup_fraction: Share of all steps spent warming up (cosine schedule).
            label_smoothing: Label smoothing of the cross-entropy loss.
            channels_last: Images in NHWC memory layout. "auto" (the default): on CUDA from
                compute capability 7.0; on a CPU where a quick check of a training step
                finds it clearly faster (oneDNN); logged with the reason, kept on resume.
            compile: Train through torch.compile (the export uses the plain module).
            init_from: Warm start: copy the weights of this checkpoint (those whose names and
                shapes match) before training, e.g. to retrain on an updated dataset. Unlike
                --ckpt_path it restores no optimizer or loop state and checks no fingerprint.
            backbone_weights: A local state_dict file (e.g. torchvision weights) copied into
                the backbone before training, where names and shapes match (no download).
            backbone: Your own network instead of `arch` (trainer/models/custom.py): an
                nn.Module mapping the normalised input to logits (N, classes) or (N, 1);
                in YAML {class_path: pkg.Net, init_args: {...}}, rebuilt by the export.
            data_info: The DataModule's `info` (input spec, classes, statistics): linked by
                the CLI, or taken from the Trainer's FixedDataModule in `setup`.
        """
        super().__init__()
        check_model_options(width=width, dropout=dropout, lr=lr, weight_decay=weight_decay,
                            warmup_fraction=warmup_fraction, label_smoothing=label_smoothing)
        self.save_hyperparameters(ignore=["backbone"], logger=False)  # loggers: the config
        self.hparams["backbone"] = custom.describe(backbone)  # a class path, never pickled
        self.__dict__["_given_backbone"] = backbone if isinstance(backbone, nn.Module) else None
        self.net: nn.Module | None = None
        if data_info is not None:
            self._build(DataInfo.read(data_info))
        self._validated_step: int | None = None
        self._lr_plan: dict | None = None  # {"start", "total"} steps of the LR schedule
        self._restored_plan: dict | None = None
        self._restored_step = 0
        self._channels_last = channels_last is True

    @property
    def data(self) -> DataInfo:
        """The data this module learns from (the hyperparameters keep it as JSON)."""
        return DataInfo.read(self.hparams.data_info)

    @data.setter
    def data(self, info: DataInfo) -> None:  # plain data in every checkpoint
        self.hparams["data_info"] = info.to_json()

    def _build(self, info: DataInfo) -> None:
        """The network, loss and metrics for the data `info` describes."""
        hp, spec, norm, self.data = self.hparams, info.input, info.normalization, info
        self.regression, outputs = info.regression, info.outputs
        if hp.backbone:
            backbone = custom.build(hp.backbone, self.__dict__["_given_backbone"])
            custom.check_output(backbone, hp.backbone["class_path"], list(spec.shape), outputs)
        else:
            backbone = build_backbone(hp.arch, list(spec.shape), outputs, hp.width, hp.dropout)
        self.net = nn.Sequential(Normalize(norm.mean, norm.std, image=spec.image), backbone)
        self._loss_and_metrics(outputs, info, hp.label_smoothing)

    def setup(self, stage: str) -> None:
        """Under a plain `lightning.Trainer` the module learns its data here, from the
        FixedDataModule the Trainer was given (the CLI passes `data_info` up front)."""
        if self.net is not None:
            return
        info = getattr(getattr(self._trainer, "datamodule", None), "info", None)
        if not isinstance(info, (DataInfo, dict)):
            raise ValueError("ClassifierModule has no data: fit it with a FixedDataModule "
                             "(trainer.fit(model, datamodule)) or pass data_info=datamodule.info")
        self._build(DataInfo.read(info, "datamodule.info"))

    def _loss_and_metrics(self, outputs: int, info: DataInfo, label_smoothing: float) -> None:
        if self.regression:
            target = info.stats["target"]
            # Predict the standardised target; `forward` maps back to the original units.
            self.register_buffer("target_mean", torch.tensor(float(target["mean"])))
            self.register_buffer("target_std", torch.tensor(max(float(target["std"]), 1e-6)))
            self.loss = nn.MSELoss()
            make = lambda: MetricCollection({"mae": MeanAbsoluteError(),  # noqa: E731
                                             "rmse": MeanSquaredError(squared=False)})
        else:
            self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
            make = lambda: MetricCollection({"acc": MulticlassAccuracy(outputs, average="micro")})  # noqa: E731
        self.metrics = nn.ModuleDict({f"{s}_metrics": make() for s in ("train", "val", "test")})
        self.train_loss = MeanMetric()
        self.test_confusion = None if self.regression else MulticlassConfusionMatrix(outputs)
        # Metric states travel in checkpoints, so an epoch resumed mid-way reports the same
        # epoch metrics as an uninterrupted one.
        for metric in (self.metrics, self.train_loss):
            metric.apply(lambda m: m.persistent(True) if hasattr(m, "persistent") else None)

    def configure_model(self) -> None:
        self._channels_last = self._choose_layout()
        if self._channels_last:
            self.net.to(memory_format=torch.channels_last)
        if self.hparams.compile and "_compiled" not in self.__dict__:
            # Kept out of the module tree, so checkpoints hold the plain weights only.
            self.__dict__["_compiled"] = torch.compile(self.net)

    def example_input(self, datamodule=None) -> torch.Tensor:
        """A training batch (at most 256) of raw inputs of the model's shape and dtype, for
        the hardware checks; drawn from its own generator, so the training stream is
        untouched."""
        batch = min(int(getattr(datamodule, "batch_size", None) or 64), 256)
        spec = self.data.input
        # On the CPU whatever default device Lightning's configure_model context has set.
        x = torch.randint(0, 256, (batch, *spec.shape), device="cpu",
                          generator=torch.Generator(device="cpu").manual_seed(0))
        return x.to(getattr(torch, spec.dtype))

    def _choose_layout(self) -> bool:
        """channels_last as configured, or as the trainer's hardware record says (the CLI
        chose it with the precision, or pinned it from the checkpoint on resume), or chosen
        now by `hardware.choose` for the trainer's precision and recorded there."""
        from trainer.hardware import choose

        if self.hparams.channels_last != "auto":
            return bool(self.hparams.channels_last)
        record = getattr(self.trainer, "hardware", None)
        if record is not None and record.channels_last is not None:
            return record.channels_last
        chosen = choose(self.trainer.strategy.root_device.type, self.net,
                        self.example_input(self.trainer.datamodule), str(self.trainer.precision))
        rank_zero_info(f"channels_last: {chosen.channels_last} ({chosen.layout_reason})")
        if record is not None:
            self.trainer.hardware = record.with_layout(chosen.channels_last, chosen.layout_reason)
        return chosen.channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw inputs (N, *input shape) -> logits (N, classes), or values (N,) in the
        target's units for regression."""
        if self._channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        net = self.__dict__.get("_compiled", self.net) if self.training else self.net
        out = forward_checked(net, x)
        if self.regression:  # (N, 1) from the built-in nets, (N, 1) or (N,) from a backbone
            return (out.squeeze(-1) if out.ndim == 2 else out) * self.target_std + self.target_mean
        return out

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        out = self(x)
        if self.regression:
            loss = self.loss((out - self.target_mean) / self.target_std,
                             (y - self.target_mean) / self.target_std)
        else:
            loss = self.loss(out, y)
        metrics = self.metrics[f"{stage}_metrics"]
        metrics.update(out, y)  # accumulated on the device, read once per epoch
        if stage == "train":
            # The epoch mean is a metric whose state travels in checkpoints (below), so an
            # epoch resumed mid-way reports the mean of all its steps, not of the resumed ones.
            self.train_loss.update(loss.detach(), len(y))
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True)
            self.log("train/loss", self.train_loss, on_step=False, on_epoch=True)
        else:
            self.log(f"{stage}/loss", loss, on_epoch=True, batch_size=len(y), sync_dist=True)
            # The rows behind the epoch's metrics: the export gate compares on them.
            self.log(f"{stage}/samples", float(len(y)), on_epoch=True, reduce_fx="sum",
                     sync_dist=True)
        self.log_dict({f"{stage}/{k}": m for k, m in metrics.items()}, on_step=False,
                      on_epoch=True, prog_bar=True)
        return loss

    def on_train_batch_start(self, batch, batch_idx) -> None:
        # A checkpoint written at an epoch's end holds that epoch's accumulated training
        # metrics; a run resumed from it must not add them to the next epoch's. Lightning
        # numbers the batches of a resumed epoch on, so 0 is only ever a fresh epoch.
        if batch_idx == 0:
            self.metrics["train_metrics"].reset()
            self.train_loss.reset()

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")
        if self.test_confusion is not None:
            self.test_confusion.update(self(batch[0]), batch[1])

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._validated_step = self.trainer.global_step

    def on_test_epoch_start(self) -> None:
        if self.test_confusion is not None:
            self.test_confusion.reset()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The epoch's logged metrics travel with the weights, into the model card on export.
        checkpoint["metrics"] = {k: float(v) for k, v in self.trainer.callback_metrics.items()
                                 if "/" in k and v.numel() == 1}
        # The step whose weights the val/* metrics describe; a mid-epoch checkpoint holds
        # newer weights than its metrics, and the export gate refuses to mix the two.
        checkpoint["validated_at_step"] = self._validated_step
        hardware = getattr(self.trainer, "hardware", None)  # into the card, as plain JSON
        checkpoint["hardware"] = hardware.to_json() if hardware is not None else None
        checkpoint["lr_plan"] = self._lr_plan
        # Dropout draws from the global generators: resuming restores them for exact replay.
        checkpoint["rng"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse to resume a checkpoint of another dataset or architecture."""
        from export.errors import InputError

        saved, ours = checkpoint.get("hyper_parameters", {}), self.hparams
        theirs = (DataInfo.read(saved["data_info"], "--ckpt_path")
                  if isinstance(saved.get("data_info"), dict) else None)
        check_same_rows(theirs, self.data, self._trainer is not None and
                        self._trainer.state.fn == "fit")  # test/validate may split otherwise
        if theirs.dataset.change:  # measured at the first start
            self.data = self.data.with_change(theirs.dataset.change)
        for key in ("arch", "width", "backbone"):
            if saved.get(key) != ours[key]:
                raise InputError(f"--ckpt_path: the checkpoint has model.{key}={saved.get(key)!r}, "
                                 f"the config has {ours[key]!r}; it loads into the same "
                                 "architecture only")
        checkpoint["state_dict"] = loadable_state(self, checkpoint["state_dict"])  # then shapes
        self._validated_step = checkpoint.get("validated_at_step")
        self._restored_plan = checkpoint.get("lr_plan")
        self._restored_step = int(checkpoint.get("global_step", 0))
        rng = checkpoint.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def on_fit_start(self) -> None:
        if self.hparams.backbone:  # every rank, so none waits for one that failed
            custom.check_exportable(self.net[1], self.hparams.backbone["class_path"],
                                    list(self.data.input.shape))
        if self.trainer.ckpt_path is not None:  # resuming: the checkpoint has the weights
            return
        if self.hparams.backbone_weights:
            self._copy_matching(self.hparams.backbone_weights, prefix="net.1.")
        if self.hparams.init_from:
            parent = self._copy_matching(self.hparams.init_from)
            dm = getattr(self.trainer, "datamodule", None)
            change = lineage.change_from_parent(parent, self.data.dataset,
                                                getattr(dm, "dataset", None))
            self.data = self.data.with_change(change)

    def _copy_matching(self, path: str, prefix: str = "") -> dict | None:
        """Copy the network's tensors in a checkpoint (with `prefix`: a backbone state_dict)
        whose names and shapes match; report how many. Returns the checkpoint, if one."""
        from lightning.pytorch.utilities import rank_zero_info

        from export.errors import InputError
        from trainer.models.registry import read_weights
        from trainer.runs import load_checkpoint

        if prefix:
            ckpt, tensors = None, {prefix + k: v for k, v in read_weights(path).items()}
        else:
            ckpt = load_checkpoint(path, "--model.init_from")
            tensors = ckpt["state_dict"]
        own = {k: v for k, v in self.state_dict().items() if k.startswith("net.")}  # no metric
        matched = {k: v for k, v in tensors.items() if k in own and own[k].shape == v.shape}
        if not matched.keys() & dict(self.named_parameters()).keys():  # another network
            raise InputError(f"--model.{'backbone_weights' if prefix else 'init_from'} {path}: "
                             "none of its weights has the name and shape of one of this model's; "
                             "expected the same network (only the layers meant to change differ)")
        self.load_state_dict(matched, strict=False)
        rank_zero_info(f"{path}: copied {len(matched)} of the network's {len(own)} tensors")
        return ckpt

    def configure_optimizers(self):
        hp = self.hparams
        decay = [p for p in self.parameters() if p.ndim > 1]
        no_decay = [p for p in self.parameters() if p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": hp.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=hp.lr, momentum=0.9, nesterov=True)
        else:
            opt = torch.optim.AdamW(groups, lr=hp.lr)
        if hp.schedule == "constant":
            return opt
        start, total = self._plan_schedule()
        if hp.schedule == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp.lr, total_steps=total)
        else:
            warmup = int(hp.warmup_fraction * (total - start))
            # A plain function: LambdaLR checkpoints no state of it, so the plan made here
            # (not a stale one from the checkpoint) drives a resumed or extended run.
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: cosine_with_warmup(
                max(0, step - start), warmup, total - start))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _plan_schedule(self) -> tuple[int, int]:
        """(first, last) step of the LR schedule. A resumed run keeps its checkpoint's plan.
        A run extended past its planned end (more epochs) gets a cosine warm restart from
        the restored step to the new end; OneCycle cannot be stretched and is refused."""
        from export.errors import InputError
        from trainer.callbacks import stepping_batches

        total = max(1, stepping_batches(self.trainer))
        if math.isinf(total):  # (max_epochs and max_steps -1: until max_time or a stop)
            raise InputError(f"--trainer.max_epochs {self.trainer.max_epochs}: a run without an "
                             f"end has no length for the {self.hparams.schedule} schedule to "
                             "plan; set --trainer.max_epochs or --trainer.max_steps, or use "
                             "--model.schedule constant")
        plan, step = self._restored_plan, self._restored_step
        if plan is None or plan["total"] == total:
            start = plan["start"] if plan else 0
        elif self.hparams.schedule == "onecycle":
            raise InputError(
                f"--trainer.max_epochs: this run's onecycle schedule was planned for "
                f"{plan['total']} steps and cannot be changed to {total}; to train on from its "
                f"weights start a new run with --model.init_from {self.trainer.ckpt_path} (or "
                f"train with --model.schedule cosine, which can be extended)")
        else:
            start = step
            rank_zero_info(f"LR schedule: extended from {plan['total']} to {total} steps; "
                           f"cosine warm restart from step {start}")
        self._lr_plan = {"start": start, "total": total}
        return start, total
