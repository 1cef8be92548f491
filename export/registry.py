"""`trainer promote`: move an MLflow registry alias (`champion`, `production`, ...) to a
model version, through the comparison gate (export/compare.py) when given data, and back.

Every move is appended to a tag of the registered model, `frozenfit.alias.<ALIAS>`: a JSON
list of {version, previous, at, how, verdict, improvement, rows}, the newest last (the 50
newest are kept), so `--rollback` knows which version held the alias before and the team
can read who was champion when. Torch-free; MLflow is the `tracking` extra.
"""

from __future__ import annotations

import datetime as dt
import json
import re

from export.errors import InputError
from export.records import load_json

HISTORY_TAG = "frozenfit.alias.{alias}"
HISTORY_KEPT = 50


class Registry:
    """One registered model's versions and one alias's holder and history."""

    def __init__(self, name: str, alias: str):
        from export.model_uri import first_line, require_mlflow

        if not name or "'" in name or not alias or not alias.replace("_", "").replace(
                "-", "").isalnum():
            raise InputError(f"model {name!r} alias {alias!r}: expected a registered model "
                             f"name without quotes and an alias of letters, digits, _ and -")
        # MLflow's own names of versions: setting one was an MlflowException traceback
        if alias.lower() == "latest" or re.fullmatch(r"[vV][0-9]+", alias):
            raise InputError(f"alias {alias!r}: reserved by MLflow for the newest version "
                             f"and for version numbers; choose another, such as champion")
        mlflow = require_mlflow(f"registered model {name!r}")
        self.client, self.name, self.alias = mlflow.MlflowClient(), name, alias
        self.errors = mlflow.exceptions.MlflowException
        try:
            self.model = self.client.get_registered_model(name)
        except self.errors as exc:
            raise InputError(f"registered model {name!r}: {first_line(exc)}") from None

    def versions(self) -> list[int]:
        found = self.client.search_model_versions(f"name='{self.name}'")
        return sorted(int(v.version) for v in found)

    def check_version(self, version: int | None) -> int:
        versions = self.versions()
        if not versions:
            raise InputError(f"registered model {self.name!r} has no versions")
        if version is None:
            return versions[-1]
        if version not in versions:
            raise InputError(f"--version {version}: registered model {self.name!r} has "
                             f"versions {', '.join(map(str, versions))}")
        return version

    def holder(self) -> int | None:
        try:
            return int(self.client.get_model_version_by_alias(self.name, self.alias).version)
        except self.errors:  # the alias is not set
            return None

    def history(self) -> list[dict]:
        tag = HISTORY_TAG.format(alias=self.alias)
        try:
            moves = load_json(self.model.tags.get(tag, "[]"))
        except ValueError:
            moves = None
        if not isinstance(moves, list) or not all(isinstance(m, dict) for m in moves):
            raise InputError(f"registered model {self.name!r}: its tag {tag!r} is not the "
                             f"list of moves this command writes; fix or delete the tag")
        return moves

    def move(self, version: int | None, previous: int | None, how: str,
             comparison=None) -> None:
        """Point the alias at `version` (None: remove it) and record the move."""
        if version is None:
            self.client.delete_registered_model_alias(self.name, self.alias)
        else:
            self.client.set_registered_model_alias(self.name, self.alias, str(version))
        entry = {"version": version, "previous": previous, "how": how,
                 "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        if comparison is not None:
            entry.update(verdict=comparison.verdict, rows=comparison.rows,
                         metric=comparison.metric, improvement=comparison.improvement)
        history = (self.history() + [entry])[-HISTORY_KEPT:]
        self.client.set_registered_model_tag(self.name, HISTORY_TAG.format(alias=self.alias),
                                             json.dumps(history))

    def uri(self, version: int) -> str:
        return f"models:/{self.name}/{version}"
