"""Checkpoint -> frozen ONNX graph with its model card, behind a parity gate.

The only module of `export/` that imports torch. The graph takes raw inputs (uint8 pixels or
float features), normalises them itself, and returns logits and probabilities with a dynamic
batch axis. Nothing is written unless onnx.checker passes and onnxruntime agrees with torch.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata as md
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from export.atomic import atomic_path
from export.card import attach_card
from export.errors import InputError

DEFAULT_OPSET = 18
DEFAULT_ATOL = 1e-3  # max |logit_onnx - logit_torch|; float32 reorderings stay ~1e-5
OUTPUTS = {"classification": ["logits", "probabilities"], "regression": ["values"]}


class ParityError(InputError):
    """onnxruntime and torch disagree beyond the tolerance."""


class Frozen(nn.Module):
    """What the graph computes: raw input -> (logits, probabilities), or (values,)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.module(x)
        return (out,) if self.module.regression else (out, out.softmax(-1))


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint without executing pickled code (`weights_only`)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise InputError(f"{path}: not a loadable checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise InputError(f"{path}: not a trainer checkpoint (no state_dict/hyper_parameters)")
    return ckpt


def init_args(ckpt: dict, key: str) -> dict:
    """Constructor arguments saved under `key`, without LightningCLI's private entries."""
    return {k: v for k, v in ckpt.get(key, {}).items() if not k.startswith("_")}


def module_from_checkpoint(ckpt: dict) -> nn.Module:
    from trainer.module import ClassifierModule

    module = ClassifierModule(**init_args(ckpt, "hyper_parameters"))
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()


def heldout_samples(ckpt: dict, limit: int = 512) -> np.ndarray:
    """Real held-out inputs for the parity check: the test split of the checkpoint's data."""
    from trainer.data.datamodule import FixedDataModule

    dm = FixedDataModule(**init_args(ckpt, "datamodule_hyper_parameters"))
    fp = ckpt["hyper_parameters"]["data_info"]["dataset"]["fingerprint"]
    if dm.dataset.fingerprint != fp:
        raise InputError(f"data.root: the dataset now has fingerprint {dm.dataset.fingerprint[:12]}, "
                         f"the checkpoint was trained on {fp[:12]}; pass --samples")
    return dm.splits["test"].arrays(limit)[0]


def checkpoint_metrics(ckpt: dict) -> dict[str, float]:
    """Metrics logged in the epoch the checkpoint was saved, plus the best monitored scores
    recorded by ModelCheckpoint callbacks."""
    out = {k: v for k, v in ckpt.get("metrics", {}).items() if not k.endswith("_step")}
    for state in ckpt.get("callbacks", {}).values():
        score, monitor = state.get("best_model_score"), state.get("monitor")
        if monitor and score is not None:
            out[f"best_{monitor}"] = float(score)
    return out


def _versions() -> dict[str, str]:
    names = ("torch", "lightning", "onnx", "onnxruntime")
    return {n: md.version(n) for n in names}


def build_card(ckpt: dict, ckpt_sha256: str) -> dict:
    hp = init_args(ckpt, "hyper_parameters")
    data = init_args(ckpt, "datamodule_hyper_parameters")
    info = hp.pop("data_info")
    task = info.get("task", "classification")
    return {
        "task": task,
        "class_names": info["class_names"],
        "input": info["input"],
        "outputs": OUTPUTS[task],
        "normalization": info["normalization"],
        "dataset": {**info["dataset"], "class_counts": info["stats"].get("class_counts")},
        "training_stats": info["stats"],
        "training": {
            "model": hp,
            "data": data,
            "seed": data.get("seed"),
            "epochs": int(ckpt.get("epoch", -1)) + 1,
            "global_step": int(ckpt.get("global_step", 0)),
            "checkpoint_sha256": ckpt_sha256,
        },
        "metrics": checkpoint_metrics(ckpt),
        "versions": _versions(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _torch_outputs(frozen: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return frozen(torch.from_numpy(x))[0].numpy()


def _top1(out: np.ndarray) -> np.ndarray:
    """Predicted class per row; for regression (N,) values there is nothing to agree on."""
    return out.argmax(-1) if out.ndim == 2 else np.zeros(len(out), np.int64)


def parity_check(frozen: nn.Module, model_bytes: bytes, samples: np.ndarray,
                 atol: float) -> dict:
    """Run onnxruntime and torch on the same samples at batch sizes 1, an odd size and all;
    raise ParityError if any logit (or regression value) differs by more than `atol`."""
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    name, first = session.get_inputs()[0].name, session.get_outputs()[0].name
    worst, agree = 0.0, []
    n = len(samples)
    for bs in sorted({1, min(7, n), n}):
        for start in range(0, n, bs):
            x = samples[start:start + bs]
            got = session.run([first], {name: x})[0]
            ref = _torch_outputs(frozen, x)
            worst = max(worst, float(np.abs(got - ref).max()))
            agree.append(_top1(got) == _top1(ref))
            if bs == 1 and start >= 31:  # 32 single-sample runs are plenty
                break
    result = {"samples": int(n), "batch_sizes": sorted({1, min(7, n), n}),
              "max_abs_diff": worst, "top1_agreement": float(np.concatenate(agree).mean()),
              "atol": atol}
    if not worst <= atol:
        raise ParityError(f"parity check failed: max |onnx - torch| logit difference {worst:.3g} "
                          f"exceeds --atol {atol:g} on {n} held-out samples; nothing written")
    return result


def export_checkpoint(ckpt_path: str | Path, out: str | Path, samples: np.ndarray | None = None,
                      opset: int = DEFAULT_OPSET, atol: float = DEFAULT_ATOL) -> dict:
    """Export `ckpt_path` to `out` (atomically) and return the model card written into it."""
    ckpt_path, out = Path(ckpt_path), Path(out)
    ckpt = load_checkpoint(ckpt_path)
    frozen = Frozen(module_from_checkpoint(ckpt)).eval()
    if samples is None:
        samples = heldout_samples(ckpt)
    spec = ckpt["hyper_parameters"]["data_info"]["input"]
    card_outputs = OUTPUTS[ckpt["hyper_parameters"]["data_info"].get("task", "classification")]
    samples = np.ascontiguousarray(samples.astype(spec["dtype"], copy=False))

    program = torch.onnx.export(
        frozen, (torch.from_numpy(samples[:2]),), input_names=[spec["name"]],
        output_names=card_outputs, opset_version=opset, dynamo=True, external_data=False,
        dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
    )
    frozen.eval()  # the exporter restores the wrapper's own mode; keep it in eval
    proto = program.model_proto
    sha = hashlib.sha256(ckpt_path.read_bytes()).hexdigest()
    card = build_card(ckpt, sha)
    card["opset"] = opset
    card["parity"] = parity_check(frozen, proto.SerializeToString(), samples, atol)
    attach_card(proto, card)
    onnx.checker.check_model(proto, full_check=True)
    with atomic_path(out) as tmp:
        onnx.save_model(proto, str(tmp))
    return card
