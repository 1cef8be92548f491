"""Architectures by name."""

from __future__ import annotations

from torch import nn

from trainer.models.nets import convnet, mlp

ARCHS = {"mlp": mlp, "convnet": convnet}


def build_backbone(arch: str, in_shape: list[int], num_classes: int, width: int = 32,
                   dropout: float = 0.1) -> nn.Module:
    """A backbone mapping normalised inputs of shape (N, *in_shape) to (N, num_classes)."""
    if arch not in ARCHS:
        raise ValueError(f"model.arch: unknown architecture {arch!r}; expected one of {sorted(ARCHS)}")
    if arch == "convnet" and len(in_shape) != 3:
        raise ValueError(f"model.arch: convnet needs image input (C, H, W), got shape {in_shape}")
    return ARCHS[arch](in_shape, num_classes, width, dropout)
