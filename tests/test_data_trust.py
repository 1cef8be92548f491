"""What the card tells about how far the validation split can be trusted: files of equal
content (kept in one split where the split is drawn, counted across the splits a user's
folders give: trainer/data/copies.py) and classes without a validation row."""

import shutil

import numpy as np
import pytest
from PIL import Image

from export.card_text import format_card
from export.dataset_card import DatasetCopies
from export.errors import InputError
from trainer.data.copies import count_copies, keep_together
from trainer.data.datamodule import FixedDataModule
from trainer.data.dataset import Split
from trainer.data.split import split_notes


def _folder(root, per_class=30, seed=0):
    rng = np.random.default_rng(seed)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).save(root / cls / f"{i}.png")
    return root


def _module(tmp_path, root, **kw):
    return FixedDataModule(source="image_folder", root=str(root), cache_dir=str(tmp_path / "c"),
                           val_fraction=0.3, test_fraction=0.3, **kw)


def _contents(split) -> list[bytes]:
    x, _ = split.arrays()
    return [row.tobytes() for row in x]


def test_copies_of_one_file_land_in_one_split(tmp_path, capfd):
    root = _folder(tmp_path / "imgs")
    for i in range(12):  # twelve cats saved twice, under another name
        shutil.copy(root / "cat" / f"{i}.png", root / "cat" / f"again{i}.png")
    data = _module(tmp_path, root)
    parts = {name: set(_contents(split)) for name, split in data.splits.items()}
    assert not parts["train"] & parts["val"] and not parts["train"] & parts["test"]
    assert not parts["val"] & parts["test"]
    assert sum(map(len, data.splits.values())) == 72  # every file is still a sample
    copies = data.info.dataset.copies
    assert copies.val_in_train == copies.test_in_train == copies.in_two_classes == 0
    assert 0 < copies.kept_together <= 12  # those drawn apart from their first copy
    assert f"{copies.kept_together} copies moved to the split of their first" in \
        capfd.readouterr().err


def test_a_dataset_without_copies_keeps_its_split(tmp_path, capfd):
    root = _folder(tmp_path / "imgs")
    data = _module(tmp_path, root)
    ds = data.dataset
    notes = split_notes(ds.train.y, [0.3, 0.3], data.hparams.seed)
    assert keep_together(notes.copy(), ds.train) == 0
    for k, name in enumerate(("val", "test", "train")):
        assert np.array_equal(np.asarray(data.splits[name].y), ds.train.y[notes == k])
    assert data.info.dataset.copies == DatasetCopies(kept_together=0, val_in_train=0,
                                                     test_in_train=0, in_two_classes=0)
    assert "data:" not in capfd.readouterr().err


def test_copies_across_given_folders_and_classes_are_counted(tmp_path, capfd):
    root = tmp_path / "imgs"
    _folder(root / "train")
    _folder(root / "val", per_class=5, seed=1)
    for i in range(3):  # val holds three training cats; a training dog is also a cat
        shutil.copy(root / "train" / "cat" / f"{i}.png", root / "val" / "cat" / f"t{i}.png")
    shutil.copy(root / "train" / "dog" / "7.png", root / "train" / "cat" / "dog7.png")
    data = _module(tmp_path, root)
    copies = data.info.dataset.copies
    assert (copies.val_in_train, copies.in_two_classes) == (3, 1)
    line = copies.line()
    assert line.startswith("3 val and 0 test samples copy a training file")
    assert "1 file contents under two or more classes" in line
    assert line in capfd.readouterr().err


def test_counts_read_samples_through_their_rows():
    x = np.zeros((5, 2), np.float32)  # five stored rows
    train = Split(x, np.array([0, 1, 0]), np.array([0, 1, 1]))  # row 1 as class 1 and 0
    val = Split(x, np.array([0, 1, 1]), np.array([2, 0, 3]))  # row 0 is a training row
    test = Split(x, np.array([1, 1]), np.array([4, 4]))  # a copy within test only
    splits = {"train": train, "val": val, "test": test}
    copies = count_copies(splits, 0, classes=2, labels_apart=True, given=True)
    assert (copies.val_in_train, copies.test_in_train, copies.in_two_classes) == (1, 0, 2)
    copies = count_copies(splits, 0, classes=2, labels_apart=False, given=True)  # a table's
    assert (copies.val_in_train, copies.in_two_classes) == (1, 0)  # labels are its content
    copies = count_copies(splits, 3, classes=0, labels_apart=True, given=False)  # regression
    assert (copies.kept_together, copies.val_in_train, copies.in_two_classes) == (3, 0, 0)
    assert count_copies(splits, 0, classes=300, labels_apart=True, given=True) == \
        count_copies(splits, 0, classes=2, labels_apart=True, given=True)  # int32 labels


@pytest.mark.parametrize("notes, rows, want, moved", [
    ([0, 1, 2, 1], [3, 3, 3, 0], [0, 0, 0, 1], 2),  # a sample keeps the note of its first copy
    ([2, 0, 1], [0, 1, 2], [2, 0, 1], 0),  # no copies: nothing moves
])
def test_keep_together_moves_copies_to_the_first(notes, rows, want, moved):
    notes = np.array(notes, np.int8)
    split = Split(np.zeros((4, 1), np.float32), np.zeros(len(notes)), np.array(rows))
    assert keep_together(notes, split) == moved
    assert notes.tolist() == want


def test_the_card_carries_and_shows_the_copies(digits_run):
    from dataclasses import replace

    from export.card import Card, read_card

    card = read_card(digits_run / "model.onnx")
    assert card.dataset.copies is None  # digits: no cache keyed by content, not looked at
    assert "copies:" not in format_card(card)
    copies = DatasetCopies(kept_together=4, val_in_train=2, test_in_train=0, in_two_classes=1)
    card = replace(card, dataset=replace(card.dataset, copies=copies))
    again = Card.from_json(card.to_json())
    assert again.dataset.copies == copies
    assert ("copies:      2 val and 0 test samples copy a training file (their scores "
            "overstate accuracy on new inputs); 1 file contents under two or more classes; "
            "4 copies moved to the split of their first") in format_card(again)
    with pytest.raises(InputError, match="copies.val_in_train"):
        Card.from_json({**card.to_json(), "dataset": {
            **card.to_json()["dataset"], "copies": {**copies.to_json(), "val_in_train": -1}}})


def test_a_copied_table_file_keeps_its_rows_in_one_split(tmp_path):
    tables = tmp_path / "t"
    tables.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        rows = [f"{x:.4f},{int(x > 0.5)}" for x in rng.random(50)]
        (tables / f"{name}.csv").write_text("f,target\n" + "\n".join(rows) + "\n")
    shutil.copy(tables / "a.csv", tables / "a_again.csv")
    data = FixedDataModule(source="tabular", root=str(tables), cache_dir=str(tmp_path / "c"),
                           val_fraction=0.3, test_fraction=0.3)
    x = {name: split.arrays()[0][:, 0].tolist() for name, split in data.splits.items()}
    assert sum(map(len, x.values())) == 150
    assert not set(x["train"]) & (set(x["val"]) | set(x["test"]))  # a's rows in one split
    assert data.info.dataset.copies.kept_together > 0


def test_a_class_without_validation_rows_is_named(tmp_path, capfd):
    root = _folder(tmp_path / "imgs")
    (root / "bird").mkdir()
    shutil.copy(root / "cat" / "0.png", root / "bird" / "only.png")  # one image: no val row
    data = _module(tmp_path, root)
    info = data.info.dataset
    assert info.val_class_counts[0] == 0 and sum(info.val_class_counts) == len(data.splits["val"])
    assert info.unmeasured(data.dataset.class_names) == "'bird'"
    assert "data: imgs: no validation rows of class 'bird': val/acc, the calibration and the " \
        "gates do not measure its answers" in capfd.readouterr().err
    assert _module(tmp_path, _folder(tmp_path / "other")).info.dataset.unmeasured(
        ["cat", "dog"]) is None


def test_the_card_names_unmeasured_classes(digits_run):
    from dataclasses import replace

    from export.card import Card, read_card

    card = read_card(digits_run / "model.onnx")
    assert len(card.dataset.val_class_counts) == 10 and min(card.dataset.val_class_counts) > 0
    assert "unmeasured:" not in format_card(card)
    counts = (0, *card.dataset.val_class_counts[1:])
    card = Card.from_json(replace(card, dataset=replace(
        card.dataset, val_class_counts=counts)).to_json())
    assert "unmeasured:  '0' (classes without a validation row)" in format_card(card)
    many = replace(card.dataset, val_class_counts=(0,) * 10)
    assert many.unmeasured(card.class_names) == "'0', '1', '2', '3', '4' and 5 more"
    from export.compare import lineage_line  # what trainer compare prints of each model

    assert lineage_line(card).endswith("; unmeasured: '0'")
    copies = DatasetCopies(kept_together=0, val_in_train=1, test_in_train=0, in_two_classes=0)
    line = lineage_line(replace(card, dataset=replace(card.dataset, copies=copies)))
    assert "; copies: 1 val and 0 test samples copy a training file" in line


def test_an_empty_val_split_of_few_images_a_class_says_so(tmp_path):
    data = _module(tmp_path, _folder(tmp_path / "imgs", per_class=1))
    with pytest.raises(InputError, match=r"imgs: the val split is empty; the dataset has 2 "
                                         r"rows in 2 classes \(data.val_fraction/test_fraction\)"
                                         r": ~1.0 rows a class, and each class gives its "
                                         r"fraction of them$"):
        _ = data.splits
