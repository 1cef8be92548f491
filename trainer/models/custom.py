"""A network of the user's own as the backbone: `ClassifierModule(backbone=net)` in a script,
or `model.backbone: {class_path: mypkg.Net, init_args: {...}}` in YAML.

The checkpoint keeps the backbone as a class path and its arguments (never a pickled
object), so `trainer export` rebuilds it; a backbone handed over as an object keeps its
class path only, and is exported by the script that holds it (ExportOnnx).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
import sys
import tempfile

import torch
from torch import nn

from export.errors import InputError


def describe(backbone: dict | nn.Module | None) -> dict | None:
    """What the hyperparameters (and so the checkpoint and the card) record of a backbone:
    {class_path, init_args}, and for an object, whose arguments are unknown, {class_path,
    init_args: None, object: True}."""
    if backbone is None:
        return None
    if isinstance(backbone, nn.Module):
        kind = type(backbone)
        return {"class_path": f"{kind.__module__}.{kind.__qualname__}", "init_args": None,
                "object": True}
    if not isinstance(backbone, dict) or not isinstance(backbone.get("class_path"), str):
        raise InputError(f"model.backbone: expected an nn.Module or {{class_path: pkg.Net, "
                         f"init_args: {{...}}}}, got {type(backbone).__name__}")
    if backbone.get("object") is True:  # read back from a checkpoint
        return {"class_path": backbone["class_path"], "init_args": None, "object": True}
    extra = sorted(set(backbone) - {"class_path", "init_args"})
    args = backbone.get("init_args") or {}
    if extra or not isinstance(args, dict):
        raise InputError(f"model.backbone: expected the keys class_path and init_args (a "
                         f"mapping), got {sorted(backbone)}")
    return {"class_path": backbone["class_path"], "init_args": dict(args)}


def build(spec: dict, given: nn.Module | None) -> nn.Module:
    """The backbone `spec` describes: `given` (the object itself), else its class built
    from the class path. Only an nn.Module subclass is ever called, so a checkpoint's
    hyperparameters can name no other callable (a function, a subprocess) to run."""
    if given is not None:
        return given
    path, args = spec["class_path"], spec["init_args"]
    if spec.get("object"):
        raise InputError(f"model.backbone: {path} was handed over as a Python object, so its "
                         f"arguments are unknown here; export it from the script that built "
                         f"it (ExportOnnx), or give model.backbone as {{class_path, init_args}}")
    module, _, name = path.rpartition(".")
    try:
        kind = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError) as exc:
        raise InputError(f"model.backbone: cannot import {path} ({exc}); install its package "
                         f"or put it on PYTHONPATH") from None
    if not (isinstance(kind, type) and issubclass(kind, nn.Module)):
        raise InputError(f"model.backbone: {path} is not an nn.Module class")
    try:
        return kind(**args)
    except Exception as exc:  # the user's constructor: any error is theirs to read
        raise InputError(f"model.backbone: {path}(**{args}) failed: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def _dry_input(in_shape: list[int]) -> torch.Tensor:
    return torch.zeros(2, *in_shape)  # normalised inputs, two rows (BatchNorm needs > 1)


def check_output(net: nn.Module, name: str, in_shape: list[int], outputs: int) -> None:
    """The backbone maps (N, *in_shape) to (N, outputs) (regression: (N, 1) or (N,)):
    checked on two rows before any training, in one line naming what was expected."""
    was = net.training
    try:
        with torch.no_grad():
            out = net.eval()(_dry_input(in_shape))
    except Exception as exc:
        raise InputError(f"model.backbone: {name} fails on input of shape (N, "
                         f"{', '.join(map(str, in_shape))}): {type(exc).__name__}: "
                         f"{(str(exc).splitlines() or [''])[0]}") from None
    finally:
        net.train(was)
    shape = tuple(getattr(out, "shape", ()))
    ok = shape == (2, outputs) or (outputs == 1 and shape == (2,))
    if not isinstance(out, torch.Tensor) or not ok:
        what = "one value per row, (N, 1)" if outputs == 1 else f"{outputs} logits per row, (N, {outputs})"
        got = f"shape {tuple(shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise InputError(f"model.backbone: {name} must map the input to {what}; it gives {got}")


@contextlib.contextmanager
def _quiet():
    """Whatever is written to stdout/stderr (file descriptors 1 and 2: the exporter prints
    whole graphs and torch logs from C++ and Python alike) goes nowhere."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy_ in zip((1, 2), saved):
                os.dup2(copy_, fd)
                os.close(copy_)


def check_exportable(net: nn.Module, name: str, in_shape: list[int]) -> None:
    """The backbone goes through the ONNX exporter (on a copy) before the first epoch, so a
    network it cannot trace fails now, in one line, not after the training (~1.5 s for a
    small net on 2 CPU cores; only for your own backbones, the built-in ones are known)."""
    probe = copy.deepcopy(net).to("cpu").eval()
    try:
        with _quiet():
            torch.onnx.export(probe, (_dry_input(in_shape),), dynamo=True, verbose=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},))
    except Exception as exc:  # the exporter wraps the cause; its first line says what
        while exc.__cause__ is not None:
            exc = exc.__cause__
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), "")
        raise InputError(f"model.backbone: {name} cannot be exported to ONNX by "
                         f"torch.onnx.export (dynamo): {type(exc).__name__}: {first[:300]}") from None
