"""The card's drift reference as typed records: what export/drift.py compares a batch's rows
with, read and checked with the rest of the card (a damaged reference is one line naming
its field when the model is loaded, not a numpy error in the middle of a job)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from export.errors import InputError
from export.records import Record, entry, is_count, is_finite, is_str, list_of

if TYPE_CHECKING:
    from export.card import Card


@dataclass(frozen=True, kw_only=True)
class DriftBins(Record):
    """One per-row quantity on the validation split (export/drift.py): its quantile bin
    edges, increasing, and the rows in each of the len(edges) + 1 bins they make."""

    name: str = entry(is_str, "a name")
    edges: tuple[float, ...] = entry(list_of(is_finite), "a list of finite numbers")
    counts: tuple[int, ...] = entry(list_of(is_count), "a list of row counts")


@dataclass(frozen=True, kw_only=True)
class DriftReference(Record):
    """What a batch's rows are compared with to tell drift: the validation split's bins of
    every continuous per-row quantity (`summary_names`, in order) and its predicted classes."""

    rows: int = entry(is_count, "a row count")
    continuous: tuple[DriftBins, ...] = entry(None, "a list of objects", record=DriftBins,
                                              many=True)
    split: str | None = entry(is_str, "a split name", None)
    classes: tuple[int, ...] | None = entry(list_of(is_count), "a list of row counts", None)
    rows_needed: tuple[int | None, ...] | None = entry(
        list_of(lambda n: n is None or is_count(n)), "a list of row counts or nulls", None)

    def validate(self, source: str) -> None:
        for i, bins in enumerate(self.continuous):
            field = f"{source}: model card field 'drift_reference.continuous[{i}]"
            if list(bins.edges) != sorted(bins.edges):
                raise InputError(f"{field}.edges' is not in increasing order")
            if len(bins.counts) != len(bins.edges) + 1 or not sum(bins.counts):
                raise InputError(f"{field}.counts' has {len(bins.counts)} counts summing to "
                                 f"{sum(bins.counts)}; expected one more than its "
                                 f"{len(bins.edges)} edges, not all zero")
        if self.classes is not None and not sum(self.classes):
            raise InputError(f"{source}: model card field 'drift_reference.classes' counts "
                             "no rows")


def summary_names(card: Card) -> list[str]:
    """Names of the continuous per-row drift checks of a model (export/drift.py), in order."""
    spec = card.input
    if spec.image:
        channels = spec.shape[0]
        label = (lambda c: "") if channels == 1 else (lambda c: f" {'RGB'[c] if channels == 3 else c}")
        names = [f"pixel mean{label(c)}" for c in range(channels)]
        names += [f"pixel std{label(c)}" for c in range(channels)]
    else:
        names = [f"feature {c}" for c in spec.columns or range(spec.shape[0])]
    return names + (["predicted value"] if card.regression else ["confidence"])
