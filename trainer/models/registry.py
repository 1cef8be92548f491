"""Architectures by name."""

from __future__ import annotations

from torch import nn

from trainer.models.nets import convnet, mlp, resnet9, stridenet, torchvision_classifier

ARCHS = {"mlp": mlp, "convnet": convnet, "stridenet": stridenet, "resnet9": resnet9}
TORCHVISION = "torchvision."  # prefix: torchvision.resnet18, torchvision.mobilenet_v3_small, ...


def build_backbone(arch: str, in_shape: list[int], num_classes: int, width: int = 32,
                   dropout: float = 0.1) -> nn.Module:
    """A backbone mapping normalised inputs of shape (N, *in_shape) to (N, num_classes)."""
    from export.errors import InputError

    known = sorted(ARCHS) + [TORCHVISION + "<name>"]
    if arch not in ARCHS and not arch.startswith(TORCHVISION):
        raise InputError(f"model.arch: unknown architecture {arch!r}; expected one of {known}")
    if arch != "mlp" and len(in_shape) != 3:
        raise InputError(f"model.arch: {arch} needs image input (C, H, W), got shape {in_shape}")
    if arch.startswith(TORCHVISION):
        try:
            return torchvision_classifier(arch[len(TORCHVISION):], in_shape, num_classes)
        except ValueError as exc:
            raise InputError(str(exc)) from None
    return ARCHS[arch](in_shape, num_classes, width, dropout)
