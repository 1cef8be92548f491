"""Names that come from the data (class names, feature columns) and end up in text users
read: the card, `trainer inspect`, CSV and HTTP answers, one-line errors. Checked where
they are made (training) and where they are read back (a model card), torch-free."""

from __future__ import annotations

import unicodedata
from pathlib import Path

from export.errors import InputError

MAX_NAME = 256  # characters: ImageNet's longest class name is ~120


def shown(name: str) -> str:
    """A name for a one-line message: quoted, and cut short when it is long."""
    return repr(name) if len(name) <= 60 else f"{name[:57]!r}... ({len(name):,} characters)"


def text_problem(name: str) -> str | None:
    """Why a name from the data (a class, a column) cannot be shown on one line of text: not
    UTF-8 (a folder's name read with surrogateescape), or a control character in it."""
    kinds = {unicodedata.category(c) for c in name}
    return ("is not UTF-8 text" if "Cs" in kinds else
            "holds a control character (a newline, tab or NUL)" if "Cc" in kinds else None)


def check_class_names(names: list[str], where: str | Path) -> None:
    """Class names are text the model's users read, one line each: `text_problem`, not
    empty nor longer than MAX_NAME, and no "|", which separates the classes of a
    prediction set."""
    for name in names:
        problem = text_problem(name) or (
            "holds '|', which separates the classes of a prediction set" if "|" in name else
            "is empty" if not name.strip() else
            f"is longer than {MAX_NAME} characters" if len(name) > MAX_NAME else None)
        if problem:
            raise InputError(f"{where}: class name {shown(name)} {problem}; rename the class")
