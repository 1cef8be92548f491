"""Every source on fixtures the tests generate, plus the real MNIST where it is present."""

from __future__ import annotations

import gzip
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

from export.errors import InputError
from tests.conftest import MNIST, requires_mnist
from trainer.data.dataset import SourceOptions
from trainer.data.sources import load_source


# ---------------------------------------------------------------- digits / arrays

def test_digits_counts_and_fingerprint_stability():
    a, b = load_source("digits", None), load_source("digits", None)
    assert a.train.x.shape == (1797, 1, 8, 8) and a.train.x.dtype == np.uint8
    assert a.num_classes == 10 and a.test is None
    assert np.bincount(a.train.y).min() >= 170
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64


def test_arrays_fingerprint_is_content_not_name(tmp_path):
    x = np.random.default_rng(0).integers(0, 255, (20, 1, 4, 4), dtype=np.uint8)
    y = np.arange(20) % 2
    np.savez(tmp_path / "one.npz", x=x, y=y)
    np.savez(tmp_path / "two.npz", x=x, y=y)
    x2 = x.copy()
    x2[0, 0, 0, 0] ^= 1
    np.savez(tmp_path / "three.npz", x=x2, y=y)
    fps = [load_source("arrays", str(tmp_path / f"{n}.npz")).fingerprint
           for n in ("one", "two", "three")]
    assert fps[0] == fps[1] != fps[2]


def test_arrays_label_outside_class_set(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros((4, 3), np.float32), y=np.array([0, 1, 2, 5]),
             class_names=np.array(["a", "b", "c"]))
    with pytest.raises(InputError, match=r"a.npz: train label 5 at row 3 is outside the 3"):
        load_source("arrays", str(tmp_path / "a.npz"))


def test_arrays_nan_features(tmp_path):
    x = np.ones((4, 3), np.float32)
    x[2, 1] = np.nan
    np.savez(tmp_path / "a.npz", x=x, y=np.array([0, 1, 0, 1]))
    with pytest.raises(InputError, match="row 2, feature 1 is NaN or infinite"):
        load_source("arrays", str(tmp_path / "a.npz"))


# ---------------------------------------------------------------- mnist (IDX)

def _write_idx(path, arr: np.ndarray, magic: int, gz: bool):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def _mnist_folder(folder, gz=True, dotted=False, n_train=30, n_test=10):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for split, n in (("train", n_train), ("t10k", n_test)):
        for kind, arr, magic in (("images", rng.integers(0, 255, (n, 28, 28)), 2051),
                                 ("labels", np.arange(n) % 10, 2049)):
            dim = "idx3" if kind == "images" else "idx1"
            name = f"{split}-{kind}.{dim}-ubyte" if dotted else f"{split}-{kind}-{dim}-ubyte"
            _write_idx(folder / (name + (".gz" if gz else "")), arr, magic, gz)
    return folder


@pytest.mark.parametrize("gz,dotted", [(True, False), (False, False), (False, True), (True, True)])
def test_mnist_reads_every_naming(tmp_path, gz, dotted):
    ds = load_source("mnist", str(_mnist_folder(tmp_path / "m", gz, dotted)))
    assert ds.train.x.shape == (30, 1, 28, 28) and ds.test.x.shape == (10, 1, 28, 28)
    assert ds.train.y.tolist() == [i % 10 for i in range(30)]


def test_mnist_fingerprint_same_for_gz_and_plain(tmp_path):
    a = load_source("mnist", str(_mnist_folder(tmp_path / "a", gz=True)))
    b = load_source("mnist", str(_mnist_folder(tmp_path / "b", gz=False, dotted=True)))
    assert a.fingerprint == b.fingerprint


def test_mnist_wrong_magic(tmp_path):
    folder = _mnist_folder(tmp_path / "m", gz=False)
    _write_idx(folder / "train-labels-idx1-ubyte", np.zeros(30), 2051, gz=False)
    with pytest.raises(InputError, match=r"train-labels-idx1-ubyte: IDX magic number is 2051, "
                                         r"expected 2049"):
        load_source("mnist", str(folder))


def test_mnist_truncated(tmp_path):
    folder = _mnist_folder(tmp_path / "m", gz=False)
    path = folder / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InputError, match=r"t10k-images-idx3-ubyte: IDX file has \d+ bytes, "
                                         r"expected \d+"):
        load_source("mnist", str(folder))


def test_mnist_longer_than_its_dimensions(tmp_path):
    folder = _mnist_folder(tmp_path / "m", gz=True)
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()) + bytes(3)))
    with pytest.raises(InputError, match=r"train-images-idx3-ubyte\.gz: IDX file holds more "
                                         r"than the 23536 bytes of its dimensions \[30, 28, 28\]"):
        load_source("mnist", str(folder))


def test_an_idx_gz_that_inflates_past_the_memory_available_is_refused_unread(tmp_path,
                                                                           monkeypatch):
    """A .gz of a few MB can inflate to gigabytes; it was read whole before its size was
    checked. The memory available is set low here; the file is real."""
    from export import readers

    folder = _mnist_folder(tmp_path / "m", gz=True, n_train=6000)  # 4.5 MiB of pixels
    monkeypatch.setattr(readers, "available_memory", lambda: 1 << 20)
    with pytest.raises(InputError, match=r"train-images-idx3-ubyte\.gz: its data \(6000 x 28 x "
                                         r"28\) is 4 MiB once read, more than the 1 MiB of "
                                         r"memory available; an IDX file is read whole"):
        load_source("mnist", str(folder))


def test_mnist_missing_folder(tmp_path):
    with pytest.raises(InputError, match="folder not found"):
        load_source("mnist", str(tmp_path / "nothing"))


@requires_mnist
def test_real_mnist():
    ds = load_source("mnist", str(MNIST))
    assert ds.train.x.shape == (60000, 1, 28, 28) and ds.test.x.shape == (10000, 1, 28, 28)
    assert np.bincount(ds.train.y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918,
                                                6265, 5851, 5949]
    assert np.bincount(ds.test.y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028,
                                               974, 1009]
    assert load_source("mnist", str(MNIST)).fingerprint == ds.fingerprint


# ---------------------------------------------------------------- cifar10

def _cifar_folder(folder, n=6):
    folder.mkdir()
    rng = np.random.default_rng(2)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 255, (n, 3072)).astype(np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n)]}
        pickle.dump(batch, open(folder / name, "wb"))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
             b"ship", b"truck"]
    pickle.dump({b"label_names": names}, open(folder / "batches.meta", "wb"))
    return folder


def test_cifar10(tmp_path):
    folder = _cifar_folder(tmp_path / "c")
    ds = load_source("cifar10", str(folder))
    assert ds.train.x.shape == (30, 3, 32, 32) and ds.test.x.shape == (6, 3, 32, 32)
    assert ds.class_names[0] == "airplane" and ds.input_spec.color_mode == "RGB"
    raw = pickle.load(open(folder / "data_batch_1", "rb"), encoding="bytes")
    assert (ds.train.x[0, 0].reshape(-1) == raw[b"data"][0, :1024]).all()  # red plane first


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_cifar10_refuses_code_in_pickles(tmp_path):
    folder = _cifar_folder(tmp_path / "c")
    pickle.dump({b"data": _Evil(), b"labels": []}, open(folder / "data_batch_3", "wb"))
    with pytest.raises(InputError, match=r"data_batch_3: not a CIFAR-10 batch .*refusing"):
        load_source("cifar10", str(folder))



@pytest.mark.parametrize("labels,needle", [
    (["1x"] * 6, "'labels' must be one integer class a row, got <U2 (6,)"),
    ([[1, 2]] * 6, "got int64 (6, 2)"),
    ([1.5] * 6, "got float64 (6,)"),
    ([2 ** 70] * 6, "got object (6,)"),
    (None, "got object ()"),
    ([[1], [1, 2]] * 3, "got object (0,)"),  # lists of several lengths
])
def test_cifar10_labels_that_are_not_classes_are_named(tmp_path, labels, needle):
    """np.asarray(labels, dtype=np.int64) raised ValueError, TypeError or OverflowError."""
    folder = _cifar_folder(tmp_path / "c")
    data = np.zeros((6, 3072), np.uint8)
    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": data, b"labels": labels}))
    with pytest.raises(InputError, match=r"data_batch_2: .*" + re.escape(needle)):
        load_source("cifar10", str(folder))


@pytest.mark.parametrize("names", [None, 5, np.array("ant"), "airplane", []])
def test_cifar10_label_names_not_a_list_are_named(tmp_path, names):
    folder = _cifar_folder(tmp_path / "c")
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    with pytest.raises(InputError, match=r"batches.meta: no 'label_names' \(a list of the "):
        load_source("cifar10", str(folder))


# ---------------------------------------------------------------- image_folder

def _png(path, size=(8, 8), mode="RGB", value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, value // 2, 255 - value)).save(path)


def _image_tree(root, split_dirs=False):
    base = root / "train" if split_dirs else root
    for cls, v in (("cat", 40), ("dog", 200)):
        for i in range(4):
            _png(base / cls / f"{i}.png", value=v + i)
    if split_dirs:
        for cls in ("cat", "dog"):
            _png(root / "test" / cls / "0.png")
    return root


def test_image_folder_decodes_converts_and_caches(tmp_path, capsys, monkeypatch):
    root = _image_tree(tmp_path / "imgs")
    _png(root / "cat" / "big.png", size=(16, 12))  # other size
    _png(root / "dog" / "gray.png", mode="L")  # other mode
    opts = SourceOptions(cache_dir=str(tmp_path / "cache"))
    ds = load_source("image_folder", str(root), opts)
    assert ds.class_names == ["cat", "dog"]
    assert ds.train.arrays()[0].shape == (10, 3, 8, 8) and ds.train.x.dtype == np.uint8
    assert "10 images: 10 new, 0 changed, 0 removed; decoded 10" in capsys.readouterr().err
    assert len(list((tmp_path / "cache").glob("image_folder-*/x.0.bin"))) == 1

    import export.imaging

    def no_decode(*a, **k):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(export.imaging, "decode", no_decode)
    again = load_source("image_folder", str(root), opts)
    assert "decoded 0" in capsys.readouterr().err
    assert again.fingerprint == ds.fingerprint
    np.testing.assert_array_equal(again.train.arrays()[0], ds.train.arrays()[0])


def test_image_folder_split_dirs_and_size_option(tmp_path):
    root = _image_tree(tmp_path / "imgs", split_dirs=True)
    opts = SourceOptions(cache_dir=str(tmp_path / "cache"), image_size=(4, 6), color_mode="L")
    ds = load_source("image_folder", str(root), opts)
    assert len(ds.train) == 8 and len(ds.test) == 2 and ds.val is None
    assert ds.train.arrays()[0].shape == (8, 1, 4, 6)
    assert ds.input_spec.shape == (1, 4, 6) and ds.input_spec.color_mode == "L"


def test_an_image_folders_own_test_and_a_drawn_val_read_the_files_they_name(tmp_path):
    """An image folder with train/ and test/ (no val/): test is test/'s files, train and val
    are drawn from train/'s. Each part reads its rows through notes (the folder's parts,
    then the drawn val's) and, after an update that leaves the cache's rows out of the
    listing's order, through the map to them too: whole, and batch by batch from the
    streaming path, each part's pixels and labels are those of the files it names."""
    from trainer.data.datamodule import FixedDataModule
    from trainer.data.split import stratified_split

    root, value = tmp_path / "imgs", {}
    for split, n in (("train", 30), ("test", 6)):
        for cls in ("a", "b"):
            for i in range(n):
                value[f"{split}/{cls}/{i:02d}.png"] = v = len(value) + 10
                _png(root / split / cls / f"{i:02d}.png", value=v)
    for added in (False, True):
        if added:  # appended to the cache last: its rows are mapped now
            value["train/a/99.png"] = 250
            _png(root / "train" / "a" / "99.png", value=250)
        train = sorted(p for p in value if p.startswith("train/"))
        labels = np.array([int(p.split("/")[1] == "b") for p in train])
        val, rest = stratified_split(labels, [0.2], seed=0)
        want = {"train": [train[i] for i in rest], "val": [train[i] for i in val],
                "test": sorted(p for p in value if p.startswith("test/"))}
        for budget in (8.0, 1e-9):
            dm = FixedDataModule(source="image_folder", root=str(root), val_fraction=0.2,
                                 cache_dir=str(tmp_path / "cache"), memory_budget_gb=budget,
                                 num_workers=0, eval_batch_size=7)
            dm.setup("fit")
            for name, files in want.items():
                x, y = dm.splits[name].arrays()
                assert x[:, 0, 0, 0].tolist() == [value[f] for f in files], (name, added)
                assert y.tolist() == [int(f.split("/")[1] == "b") for f in files]
            got = torch.cat([xb[:, 0, 0, 0] for xb, _ in dm.val_dataloader()])
            assert got.tolist() == [value[f] for f in want["val"]], budget


def test_image_folder_corrupt_image_names_file_and_keeps_the_complete_rows(tmp_path):
    root = _image_tree(tmp_path / "imgs")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    opts = SourceOptions(cache_dir=str(tmp_path / "cache"))
    with pytest.raises(InputError, match=r"broken.png: cannot decode image"):
        load_source("image_folder", str(root), opts)
    assert not list((tmp_path / "cache").rglob("*.tmp"))  # no temporary file left
    (root / "dog" / "broken.png").unlink()
    ds = load_source("image_folder", str(root), opts)
    assert len(ds.train) == 8


def test_image_folder_empty_class(tmp_path):
    root = _image_tree(tmp_path / "imgs")
    (root / "bird").mkdir()
    with pytest.raises(InputError, match=r"bird: class folder has no PNG or JPEG images"):
        load_source("image_folder", str(root), SourceOptions(cache_dir=str(tmp_path / "c")))


def test_image_folder_train_test_classes_differ(tmp_path):
    root = _image_tree(tmp_path / "imgs", split_dirs=True)
    _png(root / "test" / "bird" / "0.png")
    with pytest.raises(InputError, match=r"test: class folders \['bird', 'cat', 'dog'\] differ"):
        load_source("image_folder", str(root), SourceOptions(cache_dir=str(tmp_path / "c")))


# ---------------------------------------------------------------- tabular

def _csv(path, text):
    path.write_text(text)
    return str(path)


def test_tabular_csv_classification_with_string_labels(tmp_path):
    path = _csv(tmp_path / "t.csv", "a,b,species\n1,2.5,setosa\n3,4,virginica\n5,6,setosa\n")
    ds = load_source("tabular", path, SourceOptions(target="species"))
    assert ds.task == "classification" and ds.class_names == ["setosa", "virginica"]
    assert ds.train.y.tolist() == [0, 1, 0]
    assert ds.train.x.dtype == np.float32 and ds.input_spec.columns == ("a", "b")


@pytest.mark.parametrize("labels, names, y", [
    (["zebra", "ant", "moth", "ant"], ["ant", "moth", "zebra"], [2, 0, 1, 0]),  # first seen != sorted
    (["7", "3", "12", "3"], ["3", "7", "12"], [1, 0, 2, 0]),  # integers: numeric order, gaps kept out
    (["-1", "2", "-1", "0"], ["-1", "0", "2"], [0, 2, 0, 1]),  # negative: the sorting path
])
def test_tabular_class_names_and_indices(tmp_path, labels, names, y):
    rows = "".join(f"{i},{label}\n" for i, label in enumerate(labels))
    ds = load_source("tabular", _csv(tmp_path / "t.csv", "a,kind\n" + rows),
                     SourceOptions(target="kind", cache_dir=str(tmp_path / "cache")))
    assert ds.class_names == names and ds.train.y.tolist() == y


def test_labels_are_kept_in_the_narrowest_type_and_hashed_as_before(tmp_path):
    from dataclasses import replace

    from trainer.data.dataset import fingerprint, label_dtype, wide
    assert [label_dtype(n) for n in (2, 128, 129, 32768, 32769)] == [
        np.int8, np.int8, np.int16, np.int16, np.int32]
    # 300 string classes from a table: int16, each row its class's index
    labels = [f"c{i % 300:03d}" for i in range(900)]
    rows = "".join(f"{i},{label}\n" for i, label in enumerate(labels))
    ds = load_source("tabular", _csv(tmp_path / "t.csv", "a,kind\n" + rows),
                     SourceOptions(target="kind", cache_dir=str(tmp_path / "cache")))
    assert ds.train.y.dtype == np.int16 and ds.train.y.tolist() == [i % 300 for i in range(900)]
    # an in-memory source: int8, the fingerprint that of int64 labels (runs and cards agree
    # across the change), samples handed out as int64
    digits = load_source("digits", None)
    assert digits.train.y.dtype == np.int8 and wide(digits.train.y).dtype == np.int64
    as_before = [None if s is None else replace(s, y=s.y.astype(np.int64))
                 for s in (digits.train, digits.val, digits.test)]
    assert fingerprint(digits.class_names, as_before) == digits.fingerprint
    assert digits.train.arrays(5)[1].dtype == np.int64


def test_tabular_parquet_regression(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x1": [1.0, 2.0, 3.0], "x2": [0, 1, 0], "price": [1.5, 2.5, 9.0]}),
                   tmp_path / "t.parquet")
    ds = load_source("tabular", str(tmp_path / "t.parquet"), SourceOptions(target="price"))
    assert ds.task == "regression" and ds.class_names == []
    assert ds.train.y.dtype == np.float32 and ds.train.y.tolist() == [1.5, 2.5, 9.0]



def test_a_pandas_category_or_string_view_target_is_classes(tmp_path):
    """Parquet keeps a pandas category as a dictionary column: its values are the classes.
    It was cast to float64 ("could not convert string to float: 'bee'")."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = ["cow", "ant", "bee", "ant", "cow", "bee"] * 5
    for label in (pa.array(names).dictionary_encode(), pa.array(names, pa.string_view())):
        pq.write_table(pa.table({"x": np.arange(30.0), "label": label}), tmp_path / "t.parquet")
        ds = load_source("tabular", str(tmp_path / "t.parquet"),
                         SourceOptions(target="label", cache_dir=str(tmp_path / "c")))
        assert ds.task == "classification" and ds.class_names == ["ant", "bee", "cow"]
        got = np.concatenate([s.arrays()[1] for s in (ds.train, ds.val, ds.test) if s])
        assert sorted(got.tolist()) == sorted(["ant", "bee", "cow"].index(n) for n in names)


@pytest.mark.parametrize("label", ["date", "timestamp", "decimal", "binary", "list", "struct"])
def test_a_target_of_no_numbers_nor_names_is_named(tmp_path, label):
    """Dates, times, decimals, bytes and nested values were cast to float64: a TypeError,
    ValueError, IndexError or an allocation of petabytes."""
    import datetime
    import decimal

    import pyarrow as pa
    import pyarrow.parquet as pq

    values = {"date": [datetime.date(2020, 1, 1 + i % 3) for i in range(30)],
              "timestamp": [datetime.datetime(2020, 1, 1 + i % 3) for i in range(30)],
              "decimal": [decimal.Decimal(i % 3) for i in range(30)],
              "binary": [b"a", b"b", b"c"] * 10, "list": [[i % 3] for i in range(30)],
              "struct": [{"a": i % 3} for i in range(30)]}[label]
    pq.write_table(pa.table({"x": np.arange(30.0), "y": values}), tmp_path / "t.parquet")
    with pytest.raises(InputError, match=r"t.parquet: target column 'y' \(data.target\) is "
                                         r".*; expected numbers, booleans or strings"):
        load_source("tabular", str(tmp_path / "t.parquet"),
                    SourceOptions(target="y", cache_dir=str(tmp_path / "c")))


ARROW_HELD = """
import json, sys
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
import pyarrow as pa
import pyarrow.dataset
from trainer.data.dataset import SourceOptions
from trainer.data.sources import load_source
base = rss("VmRSS")
load_source("tabular", sys.argv[1], SourceOptions(target="label", cache_dir=sys.argv[2]))
held = rss("VmRSS")
pa.default_memory_pool().release_unused()  # what the ingest left for Arrow to hand back
print(json.dumps({"kept": held - rss("VmRSS"), "arrow": pa.default_memory_pool().max_memory()}))
"""


def test_a_tables_ingest_hands_arrows_freed_memory_back(tmp_path):
    """Arrow's allocator keeps what the decoding freed (here two files of one 1M-row group:
    ~60 MB) unless told to hand it back; a fit after the ingest then ran on top of it. After
    the ingest there is nothing left for Arrow to hand back (without the release: ~100 MB)."""
    import json
    import os
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.conftest import ROOT

    rng = np.random.default_rng(0)
    for k in range(2):
        n = 1_000_000
        cols = {f"f{i}": rng.random(n, dtype=np.float32) for i in range(4)}
        pq.write_table(pa.table({**cols, "label": rng.integers(0, 3, n)}),
                       tmp_path / f"part{k}.parquet", row_group_size=n)
    proc = subprocess.run([sys.executable, "-c", ARROW_HELD, str(tmp_path),
                           str(tmp_path / "cache")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["arrow"] > 40 << 20, got  # the decoding did hold its row groups
    assert got["kept"] < 0.1 * got["arrow"], got


def test_a_tables_ingest_trims_the_heap_as_its_rows_are_written(tmp_path, monkeypatch):
    """glibc keeps the freed batches of each file decoded on a thread of its own in that
    thread's heap: a table's ingest peaked higher the more files it had, at the same file
    size (16 x 250,000 rows: 161 MB, 2 files: 88 MB). The heap is trimmed each TRIM_BYTES of
    rows appended (then 117-128 MB), not only once a block of the listing is done."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from trainer.data import ingest

    rng = np.random.default_rng(0)
    for k in range(4):
        cols = {f"f{i}": rng.normal(size=50_000).astype(np.float32) for i in range(8)}
        pq.write_table(pa.table({**cols, "label": rng.integers(0, 3, 50_000)}),
                       tmp_path / f"part{k}.parquet")
    trims = []
    monkeypatch.setattr(ingest, "TRIM_BYTES", 1 << 20)
    monkeypatch.setattr(ingest, "release_free_memory", lambda: trims.append(1))
    ds = load_source("tabular", str(tmp_path), SourceOptions(target="label",
                                                             cache_dir=str(tmp_path / "c")))
    assert len(ds.train) == 200_000
    assert len(trims) >= 5  # 2 MB of rows a file: one after each, and the block's last


def test_tabular_features_convert_exactly_across_blocks_of_rows(tmp_path):
    """Features of every numeric type land in their row and column of float32, for a table
    longer than a conversion block, and a bad value past the first block is named by row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from trainer.data import tabular

    n = 3 * tabular.CONVERT_ROWS + 17
    rng = np.random.default_rng(0)
    cols = {"f": rng.normal(size=n), "i": rng.integers(-5, 5, n).astype(np.int32),
            "b": rng.integers(0, 2, n).astype(bool), "h": rng.normal(size=n).astype(np.float16)}
    table = pa.table({**cols, "target": rng.integers(0, 3, n)})
    x, lo, hi = tabular.feature_matrix(table, list(cols), "t")
    want = np.column_stack([v.astype(np.float32) for v in cols.values()])
    assert x.dtype == np.float32 and np.array_equal(x, want)
    assert (lo, hi) == (float(want.min()), float(want.max()))
    cols["f"][n - 3] = np.nan
    pq.write_table(pa.table({**cols, "target": rng.integers(0, 3, n)}), tmp_path / "t.parquet")
    with pytest.raises(InputError, match=rf"row {n - 3}, column 'f' is NaN or infinite"):
        load_source("tabular", str(tmp_path / "t.parquet"))


def test_tabular_classes_are_counted_across_blocks_of_rows(monkeypatch):
    """Class indices made block by block equal those of the whole column: a class first
    seen in a later block, string codes, and a negative label in the last block (which
    sends the whole column to np.unique)."""
    from trainer.data import tabular

    monkeypatch.setattr(tabular, "GATHER_ROWS", 4)
    labels = np.array([1.0, 0, 1, 0, 2, 7, 2, 0, 1, 7], np.float64)
    rows = np.arange(len(labels))[::-1].copy()
    names, y = tabular._targets(labels, rows, 10, [], "classification", "f8")
    assert names == ["0", "1", "2", "7"] and y.tolist() == [3, 1, 0, 2, 3, 2, 0, 1, 0, 1]
    codes = np.array([2, 0, 2, 1, 0, 1], np.int64)  # into ["z", "a", "m"]
    names, y = tabular._targets(codes, None, 6, ["z", "a", "m"], "classification", "i8")
    assert names == ["a", "m", "z"] and y.tolist() == [1, 2, 1, 0, 2, 0]
    labels[-1] = -3
    names, y = tabular._targets(labels, None, 10, [], "classification", "f8")
    assert names == ["-3", "0", "1", "2", "7"] and y.tolist() == [2, 1, 2, 1, 3, 4, 3, 1, 2, 0]
    names, y = tabular._targets(labels, np.arange(10), 10, [], "classification", "f8")
    assert names == ["-3", "0", "1", "2", "7"] and y.tolist() == [2, 1, 2, 1, 3, 4, 3, 1, 2, 0]


def test_tabular_labels_not_utf8_are_named_as_such(tmp_path):
    (tmp_path / "t.csv").write_bytes(b"a,target\n1,caf\xe9\n2,th\xe9\n")
    with pytest.raises(InputError, match=r"t.csv: column 'target' holds text that is not UTF-8"):
        load_source("tabular", str(tmp_path / "t.csv"))


@pytest.mark.parametrize("text,message", [
    ("a,b\n1,2\n", r"missing target column 'target'"),
    ("a,b,target\n1,x,0\n2,y,1\n", r"feature column 'b' is string, expected numbers"),
    ("a,b,target\n1,2,0\n2,inf,1\n", r"row 1, column 'b' is NaN or infinite"),
    ("a,b,target\n1,2,0\n2,,1\n", r"row 1, column 'b' is empty"),
    ("a,b,target\n1,2,0\n2,1e39,1\n", r"row 1, column 'b' is 1e\+39, which overflows float32"),
    ("a,b,target\n", r"the table has no rows"),
    # a regression target named by the split's shuffled row, or past float32 as "NaN"
    ("a,target\n1,0.5\n2,1e300\n",
     r"row 1, target column 'target' is 1e\+300, which overflows float32"),
    ("a,target\n1,0.5\n2,0.25\n3,-inf\n", r"row 2, target column 'target' is NaN or infinite"),
    ("a;b;target\n1;2;x\n", r"reads as one column 'a;b;target', its values separated by ';'"),
    # a column of free text taken for the target: every answer would carry such a name
    ("a,target\n1,x\n2," + "y" * 300 + "\n",
     r"row 1: class name 'y{57}'\.\.\. \(300 characters\) is longer than 256 characters"),
])
def test_tabular_bad_input(tmp_path, text, message):
    with pytest.raises(InputError, match=r"t.csv: " + message):
        load_source("tabular", _csv(tmp_path / "t.csv", text))


def test_unknown_source():
    with pytest.raises(InputError, match="data.source: unknown source 'imagenet'"):
        load_source("imagenet", None)


def test_a_bad_label_or_target_is_named_by_its_row_across_blocks(tmp_path, monkeypatch):
    """Labels and targets are checked a block at a time (blocks of 16 rows here): the first
    bad one is named with its row, wherever it lies."""
    from trainer.data import dataset

    monkeypatch.setattr(dataset, "READ_ROWS", 1)
    target = np.arange(50, dtype=np.float32)
    target[37] = np.inf
    with pytest.raises(InputError, match=r"t: train target at row 37 is NaN or infinite"):
        dataset.make_dataset("t", dataset.Split(np.zeros((50, 1), np.float32), target), None,
                             [], dataset.feature_spec(["a"], (0.0, 1.0)), task="regression")
    y = np.array([i % 3 for i in range(40)])
    y[33] = 7
    np.savez(tmp_path / "a.npz", x=np.zeros((40, 3), np.float32), y=y,
             class_names=np.array(["a", "b", "c"]))
    with pytest.raises(InputError, match=r"train label 7 at row 33 is outside the 3"):
        load_source("arrays", str(tmp_path / "a.npz"))
