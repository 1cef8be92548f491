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
            net = torchvision_classifier(arch[len(TORCHVISION):], in_shape, num_classes)
        except ValueError as exc:
            raise InputError(str(exc)) from None
    else:
        try:
            net = ARCHS[arch](in_shape, num_classes, width, dropout)
        except RuntimeError as exc:  # torch's allocator: --model.width 100000 asked for 720 GB
            if "can't allocate memory" not in str(exc):
                raise
            raise InputError(f"model.width {width}: {arch}'s weights need more memory than "
                             "this machine can give; choose a smaller --model.width") from None
    if len(in_shape) == 3:
        _takes(net, arch, in_shape)
    return net


def _takes(net: nn.Module, arch: str, in_shape: list[int]) -> None:
    """One image through `net` (eval mode, no gradient: a few ms at 32x32): images too
    small for its pools (convnet's 2x2 twice, VGG's five times, a ViT's fixed size) made a
    0x0 map, a traceback at the first training step."""
    import torch

    from export.errors import InputError
    from export.readers import short_reason

    mode = net.training
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, *in_shape))
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise InputError(f"model.arch: {arch} cannot take {in_shape[1]}x{in_shape[2]} images "
                         f"({short_reason(exc)}); resize them with --data.image_size, or "
                         "choose another --model.arch") from None
    finally:
        net.train(mode)


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


def read_weights(path: str) -> dict:
    """A backbone's weights file (`--model.backbone_weights`): a state_dict, or a dict
    holding one under "state_dict", read without executing pickled code."""
    import torch

    from export.errors import InputError

    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # missing file, pickled code, not a torch file
        raise InputError(f"--model.backbone_weights {path}: cannot load weights "
                         f"({type(exc).__name__})") from None
    weights = source.get("state_dict", source) if isinstance(source, dict) else source
    odd = [f"{k!r}: {type(v).__name__}" for k, v in weights.items() if not isinstance(k, str)
           or not isinstance(v, torch.Tensor)] if isinstance(weights, dict) else \
        [f"a {type(weights).__name__}"]
    if odd:
        raise InputError(f"--model.backbone_weights {path}: expected a state_dict (names "
                         f"mapped to tensors), found {odd[0][:60]}")
    return weights
