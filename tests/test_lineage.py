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

    def fit(name, *extra):
        proc = run_cli("fit", "--config", str(ROOT / "configs" / "image_folder.yaml"),
                       "--data.root", str(images), "--data.cache_dir", cache, *FIT,
                       "--trainer.logger.init_args.name", name, *extra, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
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
    proc = run_cli("inspect", str(child / "model.onnx"))
    assert "data change: 7 files added, 2 removed, 1 changed (8 rows in, 3 out)" in proc.stdout
    proc = run_cli("compare", "--champion", str(parent / "model.onnx"), "--challenger",
                   str(child / "model.onnx"), "--data", str(images))
    assert "challenger: " in proc.stdout and "data: 7 files added" in proc.stdout, proc.stdout
