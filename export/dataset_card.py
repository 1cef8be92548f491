"""The card's record of the data a model learned from: which dataset, how it was split,
what copies it holds and what changed since the parent model's."""

from __future__ import annotations

from dataclasses import dataclass

from export.records import Record, entry, is_bool, is_count, is_dict, is_num, is_str, list_of


@dataclass(frozen=True, kw_only=True)
class DatasetChange(Record):
    """Lineage: what changed in the data since the dataset of the parent model
    (`--model.init_from`), from the source's per-file snapshots (trainer/data/lineage.py).
    Changed files (same path, other content) count in both row totals."""

    parent_fingerprint: str = entry(is_str, "a SHA-256 hex string")
    known: bool = entry(is_bool, "true or false")
    note: str | None = entry(is_str, "a sentence", None)
    files_added: int | None = entry(is_num, "a number", None)
    files_removed: int | None = entry(is_num, "a number", None)
    files_changed: int | None = entry(is_num, "a number", None)
    files_unchanged: int | None = entry(is_num, "a number", None)
    rows_added: int | None = entry(is_num, "a number", None)
    rows_removed: int | None = entry(is_num, "a number", None)
    # about what share of val and test the parent trained on: drawn anew over changed data
    parent_in_eval: float | None = entry(is_num, "a number", None)

    def line(self) -> str:
        since = f"since the parent's dataset {self.parent_fingerprint[:12]}"
        if not self.known:
            return f"not known {since}: {self.note}"
        if self.files_added is None:
            return f"none {since} ({self.note}){self.eval_line()}"
        return (f"{self.files_added:,} files added, {self.files_removed:,} removed, "
                f"{self.files_changed:,} changed ({self.rows_added:,} rows in, "
                f"{self.rows_removed:,} out) {since}{self.eval_line()}")

    def eval_line(self) -> str:
        return (f"; ~{self.parent_in_eval:.0%} of val and test the parent trained on (drawn "
                "anew)" if self.parent_in_eval else "")


@dataclass(frozen=True, kw_only=True)
class DatasetCopies(Record):
    """Files of equal content, known from the source's cache keyed by content (image
    folders, tables; trainer/data/copies.py): samples moved into the split of their first
    copy where the split was drawn, samples of val and test that copy a training file (the
    split folders a user gave), and contents found under two or more classes."""

    kept_together: int = entry(is_count, "a count")
    val_in_train: int = entry(is_count, "a count")
    test_in_train: int = entry(is_count, "a count")
    in_two_classes: int = entry(is_count, "a count")

    def line(self) -> str | None:
        """What a user should know, or None when no copy is in two splits or classes."""
        parts = []
        if self.val_in_train or self.test_in_train:
            parts.append(f"{self.val_in_train:,} val and {self.test_in_train:,} test samples "
                         "copy a training file (their scores overstate accuracy on new inputs)")
        if self.in_two_classes:
            parts.append(f"{self.in_two_classes:,} file contents under two or more classes")
        if self.kept_together:
            parts.append(f"{self.kept_together:,} copies moved to the split of their first")
        return "; ".join(parts) or None


@dataclass(frozen=True, kw_only=True)
class DatasetInfo(Record):
    """Which fixed dataset the model learned from, and how it was split."""

    name: str = entry(is_str, "a name")
    fingerprint: str = entry(is_str, "a SHA-256 hex string")
    split_sizes: dict | None = entry(lambda v: is_dict(v) and all(map(is_count, v.values())),
                                     "an object of row counts", None)
    class_counts: tuple[int, ...] | None = entry(list_of(is_count), "a list of counts", None)
    val_class_counts: tuple[int, ...] | None = entry(list_of(is_count), "a list of counts", None)
    source: str | None = entry(is_str, "a source name", None)
    target: str | None = entry(is_str, "a column name", None)
    split_seed: int | None = entry(is_num, "a number", None)
    change: DatasetChange | None = entry(None, "an object", None, record=DatasetChange)
    copies: DatasetCopies | None = entry(None, "an object", None, record=DatasetCopies)

    def unmeasured(self, class_names) -> str | None:
        """The classes without a validation row, named (val/acc, the calibration and the
        gates never saw the model answer them), or None."""
        from export.names import shown

        counts = self.val_class_counts or ()
        missing = [name for name, n in zip(class_names, counts) if n == 0]
        if not missing:
            return None
        more = f" and {len(missing) - 5:,} more" if len(missing) > 5 else ""
        return ", ".join(map(shown, missing[:5])) + more
