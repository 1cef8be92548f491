"""Lineage of a retrained model: what changed in the data since its parent's dataset, from
the sources' per-file snapshots, into the card, `trainer inspect` and `trainer compare`."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from export.card import read_card
from trainer.data import lineage
from trainer.data.dataset import SourceOptions
from trainer.data.sources import load_source
from tests.conftest import ROOT, run_cli


def _png(path, value):
    """An 8x8 grey PNG: one value, or the pixels themselves."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = (Image.fromarray(value) if isinstance(value, np.ndarray)
             else Image.new("L", (8, 8), value))
    image.save(path)


def _digits_folder(root, n_per_class=30):
    """Real digits (sklearn) as 8x8 PNGs in one folder per class."""
    from sklearn.datasets import load_digits

    d = load_digits()
    for label in range(10):
        rows = np.flatnonzero(d.target == label)[:n_per_class]
        for i in rows:
            _png(root / str(label) / f"{i}.png", (d.images[i] * 15).astype(np.uint8))
    return root


def test_image_folder_changes_are_counted_file_by_file(tmp_path):
    root, opts = tmp_path / "imgs", SourceOptions(cache_dir=str(tmp_path / "cache"))
    for cls in ("a", "b"):
        for i in range(5):
            _png(root / cls / f"{i}.png", 10 * i + (cls == "b") * 100)
    before = load_source("image_folder", str(root), opts)
    assert (before.history / f"{before.fingerprint}.npy").is_file()
    _png(root / "a" / "new1.png", 7)
    _png(root / "b" / "new2.png", 8)
    (root / "a" / "0.png").unlink()
    _png(root / "b" / "3.png", 250)  # same name, other content
    os.rename(root / "a" / "4.png", root / "b" / "moved.png")  # relabelled: out and in
    after = load_source("image_folder", str(root), opts)
    change = lineage.change_since(before.fingerprint, after.fingerprint, after.history,
                                  "image_folder")
    assert change == {"parent_fingerprint": before.fingerprint, "known": True,
                      "files_added": 3, "files_removed": 2, "files_changed": 1,
                      "files_unchanged": 7, "rows_added": 4, "rows_removed": 3}
    # The same data again: nothing changed, and no snapshot is written twice.
    again = lineage.change_since(after.fingerprint, after.fingerprint, after.history, "x")
    assert again["files_added"] == again["files_removed"] == again["files_changed"] == 0
    assert len(list(after.history.glob("*.npy"))) == 2


def test_table_changes_count_rows_and_old_snapshots_are_evicted(tmp_path):
    root, opts = tmp_path / "t", SourceOptions(cache_dir=str(tmp_path / "cache"))
    root.mkdir()
    for i, rows in enumerate((100, 50)):
        pq.write_table(pa.table({"f": np.arange(rows, dtype=np.float32) + i,
                                 "target": np.arange(rows) % 2}), root / f"part{i}.parquet")
    first = load_source("tabular", str(root), opts)
    pq.write_table(pa.table({"f": np.arange(30, dtype=np.float32) + 9,
                             "target": np.arange(30) % 2}), root / "part1.parquet")
    second = load_source("tabular", str(root), opts)
    change = lineage.change_since(first.fingerprint, second.fingerprint, second.history, "tabular")
    assert (change["files_changed"], change["rows_added"], change["rows_removed"]) == (1, 30, 50)
    for k in range(lineage.KEEP):  # newer fingerprints push the first one out
        pq.write_table(pa.table({"f": np.full(3, k, np.float32), "target": [0, 1, 0]}),
                       root / "extra.parquet")
        latest = load_source("tabular", str(root), opts)
    assert len(list(latest.history.glob("*.npy"))) == lineage.KEEP
    gone = lineage.change_since(first.fingerprint, latest.fingerprint, latest.history, "tabular")
    assert not gone["known"] and "no snapshot of the parent's dataset" in gone["note"]
    assert f"newest {lineage.KEEP}" in gone["note"]


def _records(n: int, seed: int):
    """n made-up records: random path keys and digests, rows per file 1..3."""
    from trainer.data.records import Records

    rng = np.random.default_rng(seed)
    records = Records.empty(n)
    records.key[:] = np.frombuffer(rng.bytes(16 * n), "S16")
    records.digest[:] = np.frombuffer(rng.bytes(32 * n), "S32")
    records.count[:] = rng.integers(1, 4, n)
    return records


def _changed(records, seed: int):
    """`records` with every 7th file removed, every 5th changed, n/10 new ones."""
    from trainer.data.records import Records

    n, keep = len(records), np.ones(len(records), bool)
    keep[::7] = False
    out = records.take(keep)
    out.digest[::5] = _records(len(out), seed).digest[::5]
    new = _records(n // 10, seed + 1)
    return Records(**{k: np.concatenate([v, getattr(new, k)])
                      for k, v in out.columns().items()})


def _expected(old, new) -> dict:
    """The change as one whole comparison of the two in memory computes it."""
    olds = {k: i for i, k in enumerate(old.key.tolist())}
    news = {k: j for j, k in enumerate(new.key.tolist())}
    same = [k for k in news if k in olds and old.digest[olds[k]] == new.digest[news[k]]]
    changed = [k for k in news if k in olds and old.digest[olds[k]] != new.digest[news[k]]]
    kept = set(same)
    return {"files_added": sum(k not in olds for k in news),
            "files_removed": sum(k not in news for k in olds),
            "files_changed": len(changed), "files_unchanged": len(same),
            "rows_added": int(sum(new.count[j] for k, j in news.items() if k not in kept)),
            "rows_removed": int(sum(old.count[i] for k, i in olds.items() if k not in kept))}


@pytest.mark.parametrize("small", [False, True])
def test_snapshots_are_sorted_and_compared_in_blocks(tmp_path, monkeypatch, small):
    """A snapshot is written in key order a bucket at a time (with small buckets, 64 of
    them) and two are compared a block of each at a time; the counts are those of a whole
    comparison in memory."""
    from trainer.data import bucketsort
    from trainer.data import lineage as lin

    if small:
        monkeypatch.setattr(bucketsort, "SORT_ROWS", 32)
        monkeypatch.setattr(bucketsort, "READ_ROWS", 50)
        monkeypatch.setattr(lin, "READ_ROWS", 50)
    old = _records(2000, 1)
    new = _changed(old, 2)
    lin.save_snapshot(tmp_path, "a" * 64, old)
    lin.save_snapshot(tmp_path, "b" * 64, new)
    snap = np.load(tmp_path / "snapshots" / f"{'b' * 64}.npy")
    assert len(snap) == len(new) and np.all(snap["key"][:-1] < snap["key"][1:])
    assert sorted(snap["key"].tolist()) == sorted(new.key.tolist())
    change = lin.change_since("a" * 64, "b" * 64, tmp_path / "snapshots", "x")
    assert change == {"parent_fingerprint": "a" * 64, "known": True, **_expected(old, new)}
    assert change["files_removed"] == 286 and change["files_added"] == 200


def test_snapshots_hold_no_memory_per_file(tmp_path, monkeypatch):
    """Writing a snapshot and comparing two hold a block and a bucket, not a sort of every
    key with every digest gathered (64 bytes a file) or both snapshots whole (~250):
    the traced peak grows by under 4 bytes a file from 3,000 to 15,000 files."""
    import tracemalloc

    from trainer.data import bucketsort
    from trainer.data import lineage as lin

    monkeypatch.setattr(bucketsort, "SORT_ROWS", 256)
    monkeypatch.setattr(bucketsort, "READ_ROWS", 512)
    monkeypatch.setattr(lin, "READ_ROWS", 512)
    peaks = []
    for n in (3000, 15000):
        (tmp_path / str(n)).mkdir()
        old = _records(n, 1)
        new = _changed(old, 2)
        tracemalloc.start()
        try:
            lin.save_snapshot(tmp_path / str(n), "a" * 64, old)
            lin.save_snapshot(tmp_path / str(n), "b" * 64, new)
            assert lin.change_since("a" * 64, "b" * 64, tmp_path / str(n) / "snapshots",
                                    "x")["files_added"] == n // 10
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    per_file = (peaks[1] - peaks[0]) / 12000
    assert per_file < 4, f"{per_file:.1f} bytes a file ({peaks})"


def test_sources_without_a_file_cache_know_only_same_or_not(tmp_path):
    same = lineage.change_since("ab" * 32, "ab" * 32, None, "digits")
    assert same["known"] and same["rows_added"] == 0 and "files_added" not in same
    other = lineage.change_since("ab" * 32, "cd" * 32, None, "digits")
    assert not other["known"] and "digits source keeps no per-file cache" in other["note"]
    bad = tmp_path / "snapshots"
    bad.mkdir()
    (bad / f"{'ab' * 32}.npy").write_bytes(b"not numpy")  # a damaged snapshot is unknown
    np.save(bad / f"{'cd' * 32}.npy", np.zeros(2, lineage.SNAPSHOT))
    assert not lineage.change_since("ab" * 32, "cd" * 32, bad, "x")["known"]


FIT = ("--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
       "--trainer.enable_model_summary", "false", "--data.image_size", "[8, 8]",
       "--data.color_mode", "L", "--data.crop_padding", "0", "--data.hflip", "false")


@pytest.mark.slow
def test_a_warm_started_fit_records_the_data_change_in_its_card(tmp_path):
    images, cache = _digits_folder(tmp_path / "digits"), str(tmp_path / "cache")

    logs = []

    def fit(name, *extra):
        proc = run_cli("fit", "--config", str(ROOT / "configs" / "image_folder.yaml"),
                       "--data.root", str(images), "--data.cache_dir", cache, *FIT,
                       "--trainer.logger.init_args.name", name, *extra, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        logs.append(proc.stderr)
        return tmp_path / "runs" / name / "version_0"

    parent = fit("parent")
    assert read_card(parent / "model.onnx").training.dataset_change is None
    for i in range(7):  # seven new images, two removed, one replaced
        _png(images / "3" / f"new{i}.png", 30 * i)
    for old in sorted((images / "5").iterdir())[:2]:
        old.unlink()
    _png(sorted((images / "8").iterdir())[0], 99)
    ckpt = next((parent / "checkpoints").glob("best-*.ckpt"))
    child = fit("child", "--model.init_from", str(ckpt))
    change = read_card(child / "model.onnx").training.dataset_change
    assert change.known
    assert change.parent_fingerprint == read_card(parent / "model.onnx").dataset.fingerprint
    assert (change.files_added, change.files_removed, change.files_changed) == (7, 2, 1)
    assert (change.rows_added, change.rows_removed, change.files_unchanged) == (8, 3, 297)
    # val and test were drawn anew over the changed folder: most of their rows were the
    # parent's training rows (its training share, ~70%, times the 97% of today's it had)
    sizes = read_card(parent / "model.onnx").dataset.split_sizes
    assert change.parent_in_eval == pytest.approx(sizes["train"] / sum(sizes.values()) * 297 / 305,
                                                  abs=0.001)
    assert "of the val and test rows are likely rows the parent trained on" in logs[-1]
    assert "parent trained on" not in logs[0]
    proc = run_cli("inspect", str(child / "model.onnx"))
    assert "data change: 7 files added, 2 removed, 1 changed (8 rows in, 3 out)" in proc.stdout
    assert "of val and test the parent trained on (drawn anew)" in proc.stdout
    proc = run_cli("compare", "--champion", str(parent / "model.onnx"), "--challenger",
                   str(child / "model.onnx"), "--data", str(images))
    assert "challenger: " in proc.stdout and "data: 7 files added" in proc.stdout, proc.stdout


def test_the_share_of_val_and_test_a_parent_trained_on():
    from export.dataset_card import DatasetChange, DatasetInfo

    sizes = {"train": 70, "val": 15, "test": 15}
    ours = DatasetInfo(name="d", source="image_folder", fingerprint="ab" * 32, split_seed=0,
                       split_sizes=sizes)
    same = DatasetChange(parent_fingerprint="ab" * 32, known=True, rows_added=0, rows_removed=0)
    theirs = {"fingerprint": "ab" * 32, "split_sizes": sizes, "split_seed": 0}
    share = lineage._parent_in_eval
    assert share(theirs, ours, same) is None  # the parent's very split
    assert share({**theirs, "split_seed": 1}, ours, same) == 0.7  # drawn otherwise
    grown = DatasetChange(parent_fingerprint="cd" * 32, known=True, rows_added=20,
                          rows_removed=0)
    assert share({**theirs, "fingerprint": "cd" * 32}, ours, grown) == pytest.approx(0.56)
    unknown = DatasetChange(parent_fingerprint="cd" * 32, known=False, note="another source")
    assert share({**theirs, "fingerprint": "cd" * 32}, ours, unknown) is None
    assert share({"split_sizes": {"train": "x"}}, ours, grown) is None  # a foreign record
