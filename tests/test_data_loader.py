"""Splits, the epoch sampler (incl. DDP shards), device augmentation, the DataModule in
Lightning's loop, and the streaming fallback."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from tests.conftest import MNIST, requires_mnist
from trainer.data.augment import augment_batch, augmentation_seed, random_hflip, random_translate
from trainer.data.datamodule import FixedDataModule
from trainer.data.loader import EpochSampler, InMemoryLoader
from trainer.data.split import stratified_split
from trainer.module import ClassifierModule


def test_split_is_deterministic_stratified_and_disjoint():
    y = np.repeat(np.arange(4), [100, 50, 30, 20])
    a = stratified_split(y, [0.2, 0.1], seed=3)
    b = stratified_split(y, [0.2, 0.1], seed=3)
    c = stratified_split(y, [0.2, 0.1], seed=4)
    assert all((p == q).all() for p, q in zip(a, b))
    assert any(not np.array_equal(p, q) for p, q in zip(a, c))
    assert sorted(np.concatenate(a).tolist()) == list(range(200))
    assert np.bincount(y[a[0]]).tolist() == [20, 10, 6, 4]  # 20% of every class


def test_two_ranks_see_disjoint_complete_equal_shards():
    for epoch in (0, 1):
        shards = []
        for rank in (0, 1):
            s = EpochSampler(101, shuffle=True, seed=7, rank=rank, world_size=2)
            s.set_epoch(epoch)
            shards.append(s.indices())
        assert len(shards[0]) == len(shards[1]) == 50
        assert not set(shards[0].tolist()) & set(shards[1].tolist())
        union = set(shards[0].tolist()) | set(shards[1].tolist())
        assert len(union) == 100 and union <= set(range(101))  # one row trimmed, none repeated


def test_each_epoch_has_its_own_reproducible_permutation():
    s = EpochSampler(50, shuffle=True, seed=0)
    s.set_epoch(0)
    e0 = s.indices()
    s.set_epoch(1)
    e1 = s.indices()
    s.set_epoch(0)
    assert torch.equal(s.indices(), e0) and not torch.equal(e0, e1)
    assert sorted(e1.tolist()) == list(range(50))



@pytest.mark.parametrize("block_rows", [0, 8])
def test_any_seed_the_options_take_shuffles(block_rows):
    """data.seed up to 2**63-1: seed * 1_000_003 + epoch overflowed torch's seed (a
    traceback at the first batch); a seed below ~9e12 orders the rows as it did."""
    for seed in (2 ** 63 - 1, 10 ** 13):
        s = EpochSampler(50, shuffle=True, seed=seed, block_rows=block_rows)
        assert sorted(s.indices().tolist()) == list(range(50))
    small = EpochSampler(50, shuffle=True, seed=12345, block_rows=block_rows)
    small.set_epoch(3)
    gen = torch.Generator().manual_seed(12345 * 1_000_003 + 3)
    if not block_rows:
        assert torch.equal(small.indices(), torch.randperm(50, generator=gen))

def test_in_memory_loader_batches_and_length():
    x, y = torch.arange(10)[:, None], torch.arange(10)
    loader = InMemoryLoader(x, y, 4, EpochSampler(10, shuffle=False, seed=0))
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert [b[1].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    dropped = InMemoryLoader(x, y, 4, EpochSampler(10, shuffle=False, seed=0), drop_last=True)
    assert len(dropped) == len(list(dropped)) == 2


def test_translate_moves_a_pixel_by_at_most_the_padding():
    x = torch.zeros(64, 1, 9, 9, dtype=torch.uint8)
    x[:, 0, 4, 4] = 255
    out = random_translate(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    pos = [(int(r), int(c)) for r, c in (out[:, 0] == 255).nonzero()[:, 1:]]
    assert len(pos) == 64 and all(abs(r - 4) <= 2 and abs(c - 4) <= 2 for r, c in pos)
    assert len(set(pos)) > 5  # offsets differ per sample


def test_hflip_flips_about_half_and_is_seeded():
    x = torch.arange(4, dtype=torch.uint8).view(1, 1, 1, 4).repeat(200, 1, 1, 1)
    a = random_hflip(x, torch.Generator().manual_seed(1))
    b = random_hflip(x, torch.Generator().manual_seed(1))
    flipped = (a[:, 0, 0, 0] == 3).float().mean()
    assert torch.equal(a, b) and 0.35 < flipped < 0.65
    assert torch.equal(augment_batch(x, torch.Generator(), 0, False), x)


def _fit(dm, **trainer_kwargs):
    model = ClassifierModule(arch="mlp", width=8, data_info=dm.info, schedule="constant")
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, **trainer_kwargs)
    trainer.fit(model, dm)
    return trainer


class _SeenBatches(L.Callback):
    """The batches the model was given, after Lightning's transfer hooks."""

    def __init__(self):
        self.train, self.val = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train.append((batch[0].clone(), batch[1].clone(), trainer.global_step))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.val.append(batch[0].clone())


def test_limit_train_batches_and_augmentation_inside_lightning():
    dm = FixedDataModule(batch_size=32, crop_padding=1, hflip=True)
    seen = _SeenBatches()
    trainer = _fit(dm, limit_train_batches=3, limit_val_batches=1, callbacks=[seen])
    assert trainer.global_step == 3 and len(seen.train) == 3
    assert isinstance(dm.train_dataloader(), InMemoryLoader)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(0)
    for (x, y, step), (raw_x, raw_y) in zip(seen.train, loader):
        assert torch.equal(y, raw_y)  # the same rows, in the loader's order
        assert not torch.equal(x, raw_x)  # augmented on the way to the model ...
        gen = torch.Generator().manual_seed(augmentation_seed(dm.hparams.seed, 0, step, 0))
        assert torch.equal(x, augment_batch(raw_x, gen, 1, True))  # ... exactly as configured
    assert torch.equal(seen.val[0], next(iter(dm.val_dataloader()))[0])  # validation is not


def test_streaming_fallback_reads_block_shuffled_rows_exactly(tmp_path):
    fast = FixedDataModule(batch_size=100)
    slow = FixedDataModule(batch_size=100, memory_budget_gb=1e-9, num_workers=1)
    fast.setup("fit")
    slow.setup("fit")
    assert slow.streaming and not fast.streaming
    fast_loader, slow_loader = fast.train_dataloader(), slow.train_dataloader()
    sampler = slow_loader.batch_sampler.sampler  # where Lightning finds it on a DataLoader
    sampler.set_epoch(2)
    got = list(slow_loader)
    assert len(got) == len(fast.splits["train"]) // 100 == len(fast_loader)
    # Every batch holds exactly the rows the block-shuffled order names, in that order ...
    order = sampler.indices()
    x_all, y_all = fast.tensors["train"]
    for b, (gx, gy) in enumerate(got):
        rows = order[b * 100:(b + 1) * 100]
        assert torch.equal(gx, x_all[rows]) and torch.equal(gy, y_all[rows])
        assert gy.dtype == y_all.dtype == torch.int64  # the split keeps them as int8
    assert fast.splits["train"].y.dtype == slow.splits["train"].y.dtype == np.int8
    # ... a permutation whose rows stay within windows of consecutive blocks (long reads),
    # and another permutation next epoch.
    assert sorted(order.tolist()) == list(range(len(order)))
    window = sampler.block_rows * sampler.window_blocks
    for w in range(0, len(order), window):
        piece = order[w:w + window]
        spread = (piece // sampler.block_rows).unique()
        assert len(spread) <= sampler.window_blocks
    sampler.set_epoch(3)
    assert not torch.equal(sampler.indices(), order)
    assert _fit(slow, limit_val_batches=1).global_step == 12


def test_block_shuffled_shards_are_disjoint_and_contiguous_per_rank():
    shards = [EpochSampler(1000, True, 5, rank=r, world_size=2, block_rows=64).indices()
              for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 500
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    blocks = [set((s // 64).tolist()) for s in shards]
    assert len(blocks[0] & blocks[1]) <= 1  # each rank reads its own blocks (one may split)


@pytest.mark.parametrize("block", [1 << 20, 97])
def test_the_split_noted_a_byte_a_row_is_the_split_it_always_was(monkeypatch, block):
    """Runs resume and compare onto the same rows: the split made from one byte of notes a
    row equals, for labels of any count and balance and float strata, the one made from
    lists of every class's shuffled rows (the code before), seed for seed; with the notes
    read into the parts a block at a time too."""
    from trainer.data import split

    monkeypatch.setattr(split, "BLOCK", block)
    def lists(y, fractions, seed):
        rng = np.random.default_rng(seed)
        parts = [[] for _ in range(len(fractions) + 1)]
        for cls in np.unique(y):
            rows = rng.permutation(np.flatnonzero(y == cls))
            start = 0
            for k, frac in enumerate(fractions):
                take = round(frac * len(rows))
                parts[k].append(rows[start:start + take])
                start += take
            parts[-1].append(rows[start:])
        return [np.sort(np.concatenate(p)) for p in parts]

    rng = np.random.default_rng(1)
    for t in range(150):
        n, classes = int(rng.integers(1, 3000)), int(rng.integers(1, 12))
        y = rng.integers(0, classes, n) if t % 3 else rng.normal(size=n).round(1)
        fractions = [[0.1], [0.1, 0.1], [0.5, 0.25], [0.0], [0.33, 0.0]][t % 5]
        want, got = lists(y, fractions, t), stratified_split(y, fractions, t)
        assert len(got) == len(want) and all(map(np.array_equal, got, want))


def test_a_splits_notes_take_a_byte_a_row_and_one_class_order_at_a_time():
    """The split's notes peak (traced) at the notes drawn so far (a byte a row) and the
    int32 order of one class while it is drawn: two balanced classes of 2,000,000 rows
    under 3.5 bytes a row, one stratum (regression) under 5.5. With the rows' notes made
    first and a class's notes laid onto them as it was drawn: 3.55 and 6.0."""
    import tracemalloc

    from trainer.data.split import split_notes

    for classes, limit in ((2, 3.5), (1, 5.5)):
        y = np.random.default_rng(0).integers(0, classes, 2_000_000).astype(np.int8)
        tracemalloc.start()
        try:
            notes = split_notes(y, [0.1, 0.1], seed=0)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert np.bincount(notes).tolist() == [200_000, 200_000, 1_600_000] or classes == 2
        assert peak < limit * len(y), f"{classes} classes: {peak / len(y):.2f} bytes a row"


def test_a_class_beyond_large_is_drawn_a_block_at_a_time_in_little_memory(monkeypatch):
    """A class of more than LARGE rows gets its notes a block at a time: each part still
    takes exactly its share of the class, spread evenly over its rows (every block holds
    about its share), the same for a seed and another for another; the peak (traced) of a
    2,000,000-row regression table's split is then the two bytes a row of notes and a
    pass's block (~4 MiB), where the shuffled order of its one stratum made it 5 bytes a row."""
    import tracemalloc

    from trainer.data import split

    monkeypatch.setattr(split, "LARGE", 1 << 14)
    y = np.repeat(np.arange(3), [100_000, 20_000, 5_000])  # two classes beyond LARGE
    notes = split.split_notes(y, [0.1, 0.2], seed=5)
    for cls, count in ((0, 100_000), (1, 20_000), (2, 5_000)):
        mine = notes[y == cls]
        val, test = round(0.1 * count), round(0.2 * count)
        assert np.bincount(mine, minlength=3).tolist() == [val, test, count - val - test]
    shares = [np.mean(notes[a:a + 10_000] == 0) for a in range(0, 100_000, 10_000)]
    assert all(0.08 < share < 0.12 for share in shares), shares
    assert np.array_equal(notes, split.split_notes(y, [0.1, 0.2], seed=5))
    assert not np.array_equal(notes, split.split_notes(y, [0.1, 0.2], seed=6))
    stratum = np.broadcast_to(np.int8(0), 2_000_000)
    tracemalloc.start()
    try:
        split.split_notes(stratum, [0.15, 0.15], seed=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * len(stratum) + (4 << 20), f"{peak / len(stratum):.2f} bytes a row"


@pytest.mark.parametrize("block", [1 << 16, 97])
def test_a_part_read_through_its_notes_is_the_array_of_its_rows(monkeypatch, block):
    """A fit's parts are read through the split's notes (Picked), not held as arrays of
    rows: every way the code reads them (whole, slices, ranges, positions in any order,
    negative ones, one, none, through the labels) gives what the array of the part's rows
    would, with notes read a block at a time (blocks of 97 too); a position beyond the
    part is an IndexError, and a result is the caller's own (changing it changes no later
    read)."""
    from trainer.data import split

    monkeypatch.setattr(split, "BLOCK", block)
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 5000).astype(np.int8)
    notes = split.split_notes(y, [0.2, 0.1], seed=2)
    for k in range(3):
        rows, part = np.flatnonzero(notes == k), split.Picked(notes, k)
        assert len(part) == len(rows) and part.dtype == np.int32
        assert np.array_equal(np.asarray(part), rows) and np.array_equal(part[:], rows)
        for key in (slice(3, 700), slice(None, None, 7), slice(-50, None), slice(9, 9)):
            assert np.array_equal(part[key], rows[key]), key
        for positions in (rng.integers(0, len(rows), 300), rng.permutation(len(rows)),
                          np.arange(40, 400), np.array([-1, 0, -len(rows)]),
                          np.array([], np.int64), np.arange(len(rows))[::-3]):
            got = part[positions]
            assert np.array_equal(got, rows[positions]), positions[:5]
            got += 1  # the caller's own: the same read again is unchanged
            assert np.array_equal(part[positions], rows[positions])
        assert part[5] == rows[5] and part[-2] == rows[-2]
        labels = part.through(y)
        assert labels.dtype == np.int8 and np.array_equal(labels[::5], y[rows][::5])
        for beyond in (np.array([len(rows)]), np.array([-len(rows) - 1]), len(rows)):
            with pytest.raises(IndexError):
                part[beyond]


def test_a_fits_splits_hold_a_byte_a_row_not_their_rows(tmp_path):
    """The DataModule's train/val/test of 2,000,000 rows are read through one byte of
    notes a row (traced: 1.0 bytes a row held; 3.2 at the peak, while the larger of two
    classes is drawn); as arrays of rows and labels they held 5.0 and peaked at 5.4. They
    still read the rows the arrays named."""
    import tracemalloc

    n = 2_000_000
    y = np.random.default_rng(0).integers(0, 2, n).astype(np.int64)
    np.savez(tmp_path / "big.npz", x=np.arange(n, dtype=np.float32)[:, None], y=y)
    dm = FixedDataModule(source="arrays", root=str(tmp_path / "big.npz"))
    dm.dataset  # noqa: B018 (loaded before the trace)
    tracemalloc.start()
    try:
        splits = dm.splits
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 1.5 * n and peak < 4 * n, f"{held / n:.2f} held, {peak / n:.2f} at peak"
    want = stratified_split(y, [0.15, 0.15], seed=0)
    for name, rows in zip(("val", "test", "train"), want):
        got = splits[name]
        assert len(got) == len(rows)
        for a in (0, len(rows) // 2, len(rows) - 1000):
            x, labels = got.subset(np.arange(a, a + 1000)).arrays()
            want = rows[a:a + 1000]
            assert np.array_equal(x[:, 0], want) and np.array_equal(labels, y[want])


def _whole_permutation(s: EpochSampler) -> torch.Tensor:
    """The epoch's rows as the sampler made them before it made them a window at a time:
    the whole permutation at once (checkpoints of runs made then resume onto these rows)."""
    gen = torch.Generator().manual_seed(s.seed * 1_000_003 + s.epoch)
    if s.shuffle and s.block_rows:
        blocks = torch.arange(s.n).split(s.block_rows)
        order = torch.cat([blocks[b] for b in torch.randperm(len(blocks), generator=gen)])
    elif s.shuffle:
        order = torch.randperm(s.n, generator=gen)
    else:
        order = torch.arange(s.n)
    order = order[: len(s) * s.world_size]
    if not s.block_rows:
        return order[s.rank:: s.world_size]
    mine = order[s.rank * len(s): (s.rank + 1) * len(s)]
    if not s.shuffle:
        return mine
    window = s.block_rows * s.window_blocks
    return torch.cat([w[torch.randperm(len(w), generator=gen)] for w in mine.split(window)])


def test_batches_made_a_window_at_a_time_are_those_of_the_whole_permutation():
    """Every rank's batches, from any resumed batch on, with and without the last short
    batch, equal the slices of the whole permutation, for rows, ranks, block and window
    sizes that do not divide one another."""
    for n, world, block, window in ((1, 1, 3, 2), (65, 2, 7, 2), (1000, 3, 64, 16),
                                    (1023, 4, 1, 3), (4097, 2, 0, 16), (100, 4, 7, 1)):
        for shuffle, rank, epoch in ((True, 0, 0), (True, world - 1, 1), (False, world - 1, 0)):
            s = EpochSampler(n, shuffle, 5, rank=rank, world_size=world, block_rows=block,
                             window_blocks=window)
            s.set_epoch(epoch)
            whole = _whole_permutation(s)
            assert torch.equal(s.indices(), whole)
            for size, drop, skip in ((7, False, 0), (64, True, 1), (1, False, 3)):
                s.resume_skip = lambda skip=skip: skip
                want = [whole[b * size:(b + 1) * size]
                        for b in range(skip, s.num_batches(size, drop))]
                got = list(s.batches(size, drop))
                assert len(got) == len(want) and all(map(torch.equal, got, want))


def test_a_streamed_epoch_is_made_of_int32_windows_not_of_every_row():
    """The streaming path's order comes as windows of int32 rows (half the bytes of int64;
    the same permutation, test above), and an unshuffled epoch (validation, test) as
    pieces of at most a window or 65,536 rows, not one arange of every row."""
    shuffled = EpochSampler(300_000, True, 3, block_rows=1000, window_blocks=16)
    pieces = list(shuffled.chunks())
    assert {p.dtype for p in pieces} == {torch.int32}
    assert max(map(len, pieces)) == 16_000 and sum(map(len, pieces)) == 300_000
    in_order = list(EpochSampler(300_000, False, 3, block_rows=1000).chunks())
    assert [len(p) for p in in_order] == [65_536] * 4 + [300_000 - 4 * 65_536]
    assert torch.equal(torch.cat(in_order), torch.arange(300_000))


def test_a_block_shuffled_epoch_of_ten_million_rows_holds_no_permutation_of_them():
    """The streaming path's epoch order is made a window at a time: drawing every batch of
    a 10,000,000-row epoch raises this process's peak RSS by under 64 MB (the whole
    permutation, made at once, took 329 MB)."""
    import subprocess
    import sys

    code = """
import torch
from trainer.data.loader import EpochSampler
def mb(field):
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(field)) / 1024
base, rows = mb('VmRSS'), 0
for batch in EpochSampler(10_000_000, True, 1, block_rows=341).batches(256, False):
    rows += len(batch)
print(rows, mb('VmHWM') - base)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parent.parent).stdout.split()
    assert int(out[0]) == 10_000_000 and float(out[1]) < 64, out


@requires_mnist
def test_real_mnist_datamodule():
    dm = FixedDataModule(source="mnist", root=str(MNIST), val_fraction=0.1)
    sizes = {k: len(v) for k, v in dm.splits.items()}
    assert sizes["test"] == 10000 and sizes["train"] + sizes["val"] == 60000
    assert abs(sizes["val"] - 6000) <= 5  # 10% of each class, rounded per class
    stats = dm.info.stats
    assert abs(stats["mean"][0] - 0.1307 * 255) < 1.0 and abs(stats["std"][0] - 0.3081 * 255) < 1.0
    assert sum(stats["class_counts"]) == sizes["train"]
