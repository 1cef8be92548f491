"""Loaders for a fixed dataset: batches are index slices of a per-epoch permutation.

`InMemoryLoader` (the fast path): one `index_select` per batch on tensors decoded once (on
the GPU when training on CUDA); no per-item Python, no worker processes.
`streaming_loader` (datasets beyond the memory budget): a torch DataLoader with persistent
workers that reads whole batches of rows, in block-shuffled order, from the memory-mapped
row cache.
Both draw the same batches from the same `EpochSampler`, and Lightning calls
`sampler.set_epoch` on either at each epoch start.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
import torch

from trainer.data.dataset import Split, wide


class EpochSampler:
    """This rank's share of epoch `e`'s permutation, seeded by (seed, e).

    Under DDP every rank draws the same permutation and takes a disjoint, equally long
    slice of it, so all ranks run the same number of steps. With `block_rows` (the
    streaming path) the permutation is a block shuffle, as LitData and WebDataset read:
    blocks of consecutive rows in random order, then rows shuffled within a window of
    `window_blocks` blocks, so reads from disk are long and sequential; each rank then takes
    a contiguous slice, i.e. its own blocks.
    """

    def __init__(self, n: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1,
                 block_rows: int = 0, window_blocks: int = 16):
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.block_rows, self.window_blocks = block_rows, window_blocks
        self.epoch = 0
        # Batches of the current epoch already trained: 0 at an epoch's start, k when a run
        # resumes mid-epoch. The DataModule points it at the trainer's loop progress.
        self.resume_skip = lambda: 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    # Lightning's `_Stateful` protocol, so it treats the loaders as resumable. The position
    # itself is restored with the trainer's loop progress (`resume_skip`) and `set_epoch`:
    # Lightning skips loader states when the loader was built before the restore, as
    # `estimated_stepping_batches` does.
    def state_dict(self) -> dict:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state.get("epoch", self.epoch)

    def __len__(self) -> int:
        return self.n // self.world_size if self.world_size > 1 else self.n

    def indices(self) -> torch.Tensor:
        """This rank's rows of the epoch, in order (all of `chunks` at once)."""
        chunks = list(self.chunks())
        return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.long)

    def chunks(self) -> Iterator[torch.Tensor]:
        """This rank's rows of the epoch, in order, a piece at a time. A block shuffle
        (the streaming path, for datasets beyond memory) is made a shuffle window at a
        time: only the block order is held whole (8 bytes a block, where a permutation of
        every row cost 8 bytes a row, ~32 while it was made). Same generator draws in the
        same order as the whole permutation (the block order, then each window's), so the
        rows are the same."""
        # (mod 2**63: torch takes no larger seed; the same seed as before below ~9e12)
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2 ** 63)
        if self.block_rows:
            yield from self._block_chunks(gen)
            return
        order = torch.randperm(self.n, generator=gen) if self.shuffle else torch.arange(self.n)
        # Trim the tail so every rank gets exactly len(self) rows.
        yield order[: len(self) * self.world_size][self.rank:: self.world_size]

    def _block_chunks(self, gen: torch.Generator) -> Iterator[torch.Tensor]:
        """Blocks of `block_rows` consecutive rows in a random order, this rank's contiguous
        slice of them (its own blocks), rows shuffled within each window of
        `window_blocks` blocks. Rows are int32 below 2**31 (torch.randperm draws the same
        permutation in either width) and a window's pieces are let go before it is handed
        on: a window of a million rows held ~32 MB as int64 pieces, their concatenation,
        its permutation and the gather; now ~12."""
        size, first = self.block_rows, self.rank * len(self)
        last, index = first + len(self), torch.int32 if self.n < 2**31 else torch.int64
        window = size * self.window_blocks
        if not self.shuffle:  # in order, a window at a time (not an arange of every row)
            step = max(window, 1 << 16)
            yield from (torch.arange(a, min(last, a + step), dtype=index)
                        for a in range(first, last, step))
            return
        pos, parts, held = 0, [], 0
        for b in torch.randperm(-(-self.n // size), generator=gen).tolist():
            a, e = b * size, min(b * size + size, self.n)  # at pos..pos+e-a of the order
            lo, hi = max(a, a + first - pos), min(e, e + last - (pos + e - a))
            pos += e - a
            if lo < hi:
                parts.append(torch.arange(lo, hi, dtype=index))
                held += hi - lo
            while held >= window or (held and pos >= last):
                rows = torch.cat(parts)
                rest = rows[window:].clone()
                parts, held = [rest] if len(rest) else [], len(rest)
                rows = rows[:window]
                yield rows[torch.randperm(len(rows), generator=gen, dtype=index)]
            if pos >= last:
                return

    def num_batches(self, batch_size: int, drop_last: bool) -> int:
        return len(self) // batch_size if drop_last else math.ceil(len(self) / batch_size)

    def batches(self, batch_size: int, drop_last: bool) -> Iterator[torch.Tensor]:
        """The epoch's batches from the `resume_skip()`-th on (those before are drawn,
        not yielded: the rows after them are the same as in an unbroken epoch)."""
        skip, total, b = self.resume_skip(), self.num_batches(batch_size, drop_last), 0
        carry = torch.zeros(0, dtype=torch.long)  # rows of a batch that spans two chunks
        for chunk in self.chunks():
            if len(carry):  # only the spanning batch is copied, not the chunk
                need = batch_size - len(carry)
                carry, chunk = torch.cat([carry, chunk[:need]]), chunk[need:]
                if len(carry) < batch_size:
                    continue
                if b < total and b >= skip:
                    yield carry
                carry, b = carry[:0], b + 1
            whole = min(len(chunk) // batch_size, max(total - b, 0))
            for k in range(whole):
                if b >= skip:
                    yield chunk[k * batch_size:(k + 1) * batch_size]
                b += 1
            carry = chunk[whole * batch_size:] if b < total else carry[:0]
        if b < total and len(carry) and b >= skip:  # the last, short batch (not drop_last)
            yield carry


class InMemoryLoader:
    batch_sampler = None  # Lightning probes DataLoader attributes; batching is done here

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                 sampler: EpochSampler, drop_last: bool = False):
        self.x, self.y = x, y
        self.batch_size, self.drop_last = batch_size, drop_last
        self.sampler = sampler

    def __len__(self) -> int:
        return self.sampler.num_batches(self.batch_size, self.drop_last)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    def __iter__(self):
        for rows in self.sampler.batches(self.batch_size, self.drop_last):
            rows = rows.to(self.x.device, non_blocking=True)
            yield self.x.index_select(0, rows), self.y.index_select(0, rows)


class _BatchSampler:
    """Adapts EpochSampler to DataLoader's batch_sampler protocol."""

    def __init__(self, sampler: EpochSampler, batch_size: int, drop_last: bool):
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last

    def __len__(self) -> int:
        return self.sampler.num_batches(self.batch_size, self.drop_last)

    def __iter__(self):
        for rows in self.sampler.batches(self.batch_size, self.drop_last):
            yield rows.tolist()


def block_rows(split: Split) -> int:
    """Rows per shuffle block of the streaming path: ~1 MiB of consecutive rows (one row
    when a row is larger). Not a floor of rows: the reader keeps 32 blocks, which for
    224x224 RGB rows in blocks of 64 held 300 MB; in blocks of 6 rows, 29 MB."""
    return max(1, (1 << 20) // max(1, split.x[:1].nbytes))


class _Rows(torch.utils.data.Dataset):
    """Whole-batch reads from a split on disk. With `block_rows` (the block shuffle) whole
    blocks are read, one sequential read each, and the last `keep` blocks kept: a shuffle
    window's batches are served from the blocks it spans."""

    def __init__(self, split: Split, block_rows: int = 0, keep: int = 32):
        self.split, self.block_rows, self.keep = split, block_rows, keep
        self.blocks: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self.split)

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Block b's inputs and labels (the labels kept with them: a split read through
        its notes finds a batch's labels there, not a row at a time)."""
        if b in self.blocks:
            self.blocks.move_to_end(b)
        else:
            first = b * self.block_rows
            last = min(len(self.split), first + self.block_rows)
            part = self.split.subset(np.arange(first, last))
            self.blocks[b] = part.arrays()[0], np.asarray(part.y)
            if len(self.blocks) > self.keep:
                self.blocks.popitem(last=False)
        return self.blocks[b]

    def __getitems__(self, rows: list[int]):
        rows = np.asarray(rows)
        x = np.empty((len(rows), *self.split.x.shape[1:]), self.split.x.dtype)
        y = np.empty(len(rows), self.split.y.dtype)
        order = np.argsort(rows)  # by block (sorted reads are sequential on disk)
        if self.block_rows:  # gathered a block's rows at a time in row order, then placed
            ordered = rows[order]
            blocks = ordered // self.block_rows
            cuts = [0, *(np.flatnonzero(blocks[1:] != blocks[:-1]) + 1).tolist(), len(rows)]
            xs, ys = np.empty_like(x), np.empty_like(y)
            for a, e in itertools.pairwise(cuts):
                b = int(blocks[a])
                (bx, by), at = self._block(b), ordered[a:e] - b * self.block_rows
                np.take(bx, at, axis=0, out=xs[a:e])
                np.take(by, at, out=ys[a:e])
            x[order], y[order] = xs, ys
        else:
            part = self.split.subset(rows[order])
            x[order], y[order] = part.arrays()[0], np.asarray(part.y)
        return torch.from_numpy(x), torch.from_numpy(wide(y))


def _keep(batch):
    return batch


class _StreamingLoader(torch.utils.data.DataLoader):
    """A DataLoader that is resumable like InMemoryLoader (the sampler keeps the state).

    Its iterator starts its workers at the first `next`, not at `iter`: Lightning creates
    the training iterator while setting up the loop, before a resumed run's `set_epoch`, and
    a DataLoader's iterator draws its first batches of indices as soon as it exists."""

    def __iter__(self):
        def lazy():
            yield from super(_StreamingLoader, self).__iter__()
        return lazy()

    def state_dict(self) -> dict:
        return self.batch_sampler.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.sampler.load_state_dict(state)


def streaming_loader(split: Split, batch_size: int, sampler: EpochSampler, drop_last: bool,
                     num_workers: int) -> torch.utils.data.DataLoader:
    return _StreamingLoader(
        _Rows(split, sampler.block_rows if sampler.shuffle else 0),
        batch_sampler=_BatchSampler(sampler, batch_size, drop_last),
        collate_fn=_keep, num_workers=num_workers, persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        # Its own generator: each iterator draws a worker seed, which from the global RNG
        # would shift the model's random stream by a different amount in a resumed run.
        generator=torch.Generator().manual_seed(sampler.seed))
