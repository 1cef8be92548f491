"""The in-memory loader: batches are index slices of a per-epoch permutation.

No per-item Python, no worker processes: one `index_select` per batch on tensors that were
decoded once (and that live on the GPU when training on CUDA). Lightning treats it as an
ordinary dataloader: it has `len()`, and `sampler.set_epoch` is called at each epoch start.
"""

from __future__ import annotations

import math

import torch


class EpochSampler:
    """Yields this rank's share of epoch `e`'s permutation, seeded by (seed, e).

    Under DDP every rank draws the same permutation and takes a disjoint, equally long
    strided slice of it, so all ranks run the same number of steps.
    """

    def __init__(self, n: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.world_size if self.world_size > 1 else self.n

    def indices(self) -> torch.Tensor:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=gen)
        else:
            order = torch.arange(self.n)
        # Trim the tail so every rank gets exactly len(self) rows.
        return order[: len(self) * self.world_size][self.rank:: self.world_size]


class InMemoryLoader:
    batch_sampler = None  # Lightning probes DataLoader attributes; batching is done here

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                 sampler: EpochSampler, drop_last: bool = False):
        self.x, self.y = x, y
        self.batch_size, self.drop_last = batch_size, drop_last
        self.sampler = sampler

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        idx = self.sampler.indices().to(self.x.device)
        for b in range(len(self)):
            rows = idx[b * self.batch_size: (b + 1) * self.batch_size]
            yield self.x.index_select(0, rows), self.y.index_select(0, rows)
