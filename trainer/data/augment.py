"""Batched image augmentation on the device: one call per batch, no per-item Python."""

from __future__ import annotations

import torch


def random_translate(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding by `padding` pixels (a random translation), drawn per
    sample. x: (N, C, H, W) -> (N, C, H, W)."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)  # (N, C, H+2p, W+2p)
    dy = torch.randint(0, 2 * padding + 1, (n, 1), generator=gen, device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), generator=gen, device=x.device)
    rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]  # (N, 1, H, 1)
    cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]  # (N, 1, 1, W)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def random_hflip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Flip each sample left-right with probability 1/2. x: (N, C, H, W)."""
    flip = torch.rand(len(x), generator=gen, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def augment_batch(x: torch.Tensor, gen: torch.Generator, crop_padding: int = 0,
                  hflip: bool = False) -> torch.Tensor:
    if crop_padding > 0:
        x = random_translate(x, crop_padding, gen)
    if hflip:
        x = random_hflip(x, gen)
    return x
