"""What a model learns about its data before the first step: the DataModule's `info`.

A typed record (export/records.py) that travels as JSON in the checkpoint's
hyperparameters (`data_info`, so a checkpoint stays plain data) and from there into the
model card. Readers take it with `DataInfo.read(...)` and use attributes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from export.card import OUTPUTS, InputSpec
from export.dataset_card import DatasetChange, DatasetInfo
from export.records import Record, entry, is_dict, is_num, list_of, one_of


@dataclass(frozen=True, kw_only=True)
class Normalization(Record):
    """Per-channel (images) or per-feature (tables) mean and std of the training split."""

    mean: tuple[float, ...] = entry(list_of(is_num), "a list of numbers")
    std: tuple[float, ...] = entry(list_of(is_num), "a list of numbers")


@dataclass(frozen=True, kw_only=True)
class DataInfo(Record):
    """The task, input, classes, normalisation, dataset identity and the training split's
    statistics (the card's `training_stats`: drift and calibration references)."""

    task: str = entry(one_of(*OUTPUTS), "classification or regression", "classification")
    input: InputSpec = entry(None, "an object", record=InputSpec)
    class_names: tuple[str, ...] = entry(list_of(lambda v: isinstance(v, str)),
                                         "a list of class names", [])
    normalization: Normalization = entry(None, "an object", record=Normalization)
    dataset: DatasetInfo = entry(None, "an object", record=DatasetInfo)
    stats: dict = entry(is_dict, "an object", {})

    @classmethod
    def read(cls, value: DataInfo | dict, source: str = "checkpoint") -> DataInfo:
        """A record as given, or read from its JSON (a checkpoint's `data_info`)."""
        return value if isinstance(value, DataInfo) else cls.from_json(value, source, "data_info.")

    @property
    def regression(self) -> bool:
        return self.task == "regression"

    @property
    def outputs(self) -> int:
        """The network's output width: one value, or one logit per class."""
        return 1 if self.regression else len(self.class_names)

    def with_change(self, change: DatasetChange | None) -> DataInfo:
        """The same data, with the lineage measured against the parent model's dataset."""
        return dataclasses.replace(self, dataset=dataclasses.replace(self.dataset, change=change))
