"""Typed records read from JSON: the model card's building blocks.

A record is a frozen dataclass whose fields carry their own check (`entry`); `from_json`
reads a JSON object into it, naming the dotted field in one line when a value is missing
or of the wrong kind, and `to_json` writes it back. Keys a record does not know are kept
in `extra` and written back unchanged, so a document survives a read-write round trip.
Pure Python: the deploy side reads records without torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from export.errors import InputError

_MISSING = object()


def load_json(text: str | bytes):
    """json.loads, where a document nested deeper than the decoder can follow is a ValueError
    like any other text that is not JSON (json raises RecursionError there: a traceback in
    every reader that took ValueError for a damaged file)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested deeper than the decoder can follow") from None


def is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_bool(v) -> bool:
    return isinstance(v, bool)


def is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def is_finite(v) -> bool:
    return is_num(v) and math.isfinite(v)


def is_str(v) -> bool:
    return isinstance(v, str)


def is_dict(v) -> bool:
    return isinstance(v, dict)


def list_of(kind: Callable[[Any], bool], size: int | None = None) -> Callable[[Any], bool]:
    return lambda v: (isinstance(v, list) and all(kind(x) for x in v)
                      and (size is None or len(v) == size))


def one_of(*allowed) -> Callable[[Any], bool]:
    return lambda v: v in allowed


def entry(check: Callable[[Any], bool] | None, expected: str, default: Any = _MISSING,
          record: type | None = None, many: bool = False) -> Any:
    """A field read from JSON: `check` its value (lists become tuples) or read it as a
    nested `record` (with `many`, a list of them, read as a tuple); without `default` the
    field is required."""
    meta = {"check": check, "expected": expected, "record": record, "many": many}
    if default is _MISSING:
        return field(metadata=meta)
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def fail(source: str, dotted: str, value: Any, expected: str) -> None:
    got = "missing" if value is _MISSING else json.dumps(value)[:60]
    raise InputError(f"{source}: model card field {dotted!r} is {got}; expected {expected}")


@dataclass(frozen=True, kw_only=True)
class Record:
    """A JSON object of the card; subclasses declare their fields with `entry`."""

    extra: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, obj: Any, source: str = "model card", prefix: str = ""):
        if not isinstance(obj, dict):
            fail(source, prefix.rstrip(".") or cls.__name__, obj, "an object")
        values, known = {}, {"extra"}
        for f in dataclasses.fields(cls):
            if f.name == "extra":
                continue
            known.add(f.name)
            meta, dotted, value = f.metadata, prefix + f.name, obj.get(f.name, _MISSING)
            required = f.default is dataclasses.MISSING and \
                f.default_factory is dataclasses.MISSING
            if value is _MISSING or (value is None and not required):
                if required:
                    fail(source, dotted, value, meta["expected"])
                continue
            if meta["record"] is not None and meta["many"]:
                if not isinstance(value, list):
                    fail(source, dotted, value, meta["expected"])
                value = [meta["record"].from_json(v, source, f"{dotted}[{i}].")
                         for i, v in enumerate(value)]
            elif meta["record"] is not None:
                value = meta["record"].from_json(value, source, dotted + ".")
            elif not meta["check"](value):
                fail(source, dotted, value, meta["expected"])
            values[f.name] = tuple(value) if isinstance(value, list) else value
        record = cls(**values, extra={k: v for k, v in obj.items() if k not in known})
        record.validate(source)
        return record

    def validate(self, source: str) -> None:
        """Agreement between fields, checked after reading (one line naming the field)."""

    def to_json(self) -> dict:
        out = dict(self.extra)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or (value is None and f.default is None):
                continue
            out[f.name] = (value.to_json() if isinstance(value, Record)
                           else [v.to_json() if isinstance(v, Record) else v for v in value]
                           if isinstance(value, tuple) else value)
        return out
