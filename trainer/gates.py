"""Gates an export passes beyond parity: the model must beat the best constant answer."""

from __future__ import annotations

import sys

import numpy as np

from export.errors import InputError


class TrivialModelError(InputError):
    """The model scores no better than always giving the same answer."""


def baseline_check(consistency: dict, val_y: np.ndarray, card: dict, allow: bool,
                   source: str) -> dict:
    """The best constant answer's score on the validation split (its most common class; its
    median target, for MAE) beside the graph's own, which `consistency` measured. A model
    that does not beat it is refused, unless `allow`: it would answer as if it had learned
    nothing (an EMA whose horizon is longer than the run exports one at chance)."""
    if not consistency.get("checked"):
        return {"checked": False, "reason": consistency.get("reason", "")}
    y, graph, key = np.asarray(val_y), float(consistency["graph"]), consistency["metric"]
    if card["task"] == "regression":
        answer = float(np.median(y))
        constant = float(np.abs(y - answer).mean())
        better, said = graph < constant, f"{answer:.4g}"
    else:
        counts = np.bincount(y.astype(np.int64))
        top = int(counts.argmax())
        constant = float(counts[top] / len(y))
        better, said = round(graph * len(y)) > counts[top], f"class {card['class_names'][top]!r}"
    line = (f"{key} {graph:.4f} on {len(y)} validation rows vs {constant:.4f} for always "
            f"answering {said}")
    if not better and not allow:
        raise TrivialModelError(
            f"{source}: the model is no better than a constant answer ({line}); not exported "
            f"(--export.allow_trivial true, or trainer export --allow-trivial, exports it)")
    if not better:
        print(f"export: WARNING: the model is no better than a constant answer ({line}); "
              f"exported because it was allowed", file=sys.stderr)
    return {"checked": True, "metric": key, "model": graph, "constant": constant,
            "constant_answer": said, "better": bool(better)}
