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
    net = ARCHS[arch](in_shape, num_classes, width, dropout)
    halvings = sum(isinstance(m, nn.MaxPool2d) for m in net.modules())  # 2x2, unpadded
    if len(in_shape) == 3 and min(in_shape[1:]) < 2 ** halvings:  # (a pool of 0x0 fails)
        side = 2 ** halvings
        raise InputError(f"model.arch: {arch} halves its images {halvings} times, so it takes "
                         f"{side}x{side} or larger; got {in_shape[1]}x{in_shape[2]} (resize "
                         "with --data.image_size, or --model.arch stridenet or mlp)")
    return net


def forward_checked(net: nn.Module, x):
    """`net(x)`; a training batch of one row, which batch normalisation cannot normalise,
    is one line saying so, not torch's ValueError from inside the model."""
    try:
        return net(x)
    except ValueError as exc:
        if len(x) != 1 or "more than 1 value per channel" not in str(exc):
            raise
        from export.errors import InputError

        raise InputError("a training batch of 1 row: the model's batch normalisation needs "
                         "2 or more (--data.batch_size, or more training rows)") from None
