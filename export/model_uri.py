"""`--model models:/NAME/VERSION` or `runs:/RUN_ID/model`: an ONNX file kept in MLflow,
downloaded through MLflow's own client (tracking store from MLFLOW_TRACKING_URI) for
`trainer predict` and `trainer serve`. Torch-free; MLflow is the `tracking` extra."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from export.errors import InputError

EXTRA = "pip install '.[tracking]' from a checkout, or 'frozenfit[tracking]' from a wheel"


def resolve_model_uri(model: str) -> str:
    """`models:/NAME/VERSION` or `runs:/RUN_ID/PATH` -> a local ONNX file (downloaded through
    MLflow, tracking store from MLFLOW_TRACKING_URI); anything else is a path, unchanged."""
    if not model.startswith(("models:/", "runs:/")):
        return model
    return _download(model)


def registry_alias(uri: str) -> tuple[str, str] | None:
    """(NAME, ALIAS) of `models:/NAME@ALIAS`, else None."""
    if uri.startswith("models:/") and "@" in uri and "/" not in uri[len("models:/"):]:
        name, _, alias = uri[len("models:/"):].partition("@")
        return name, alias
    return None


def registered_name(uri: str) -> str | None:
    """NAME of `models:/NAME/VERSION` or `models:/NAME@ALIAS`, else None."""
    if not uri.startswith("models:/"):
        return None
    return uri[len("models:/"):].split("/")[0].partition("@")[0] or None


def served_version(uri: str) -> str:
    """The registry version `uri` names now (the alias's holder for `@ALIAS`), else "1"."""
    from export.registry import Registry

    if alias := registry_alias(uri):
        holder = Registry(*alias).holder()
        if holder is None:
            raise InputError(f"--model {uri}: registered model {alias[0]!r} has no alias "
                             f"{alias[1]!r}")
        return str(holder)
    rest = uri[len("models:/"):].split("/") if uri.startswith("models:/") else []
    return rest[1] if len(rest) == 2 and rest[1].isdigit() else "1"


def require_mlflow(what: str):
    """mlflow, with a tracking store named: one line naming `what` otherwise."""
    try:
        import mlflow
    except ModuleNotFoundError:
        raise InputError(f"{what}: needs the tracking extra: {EXTRA}") from None
    if not os.environ.get("MLFLOW_TRACKING_URI"):  # MLflow's default creates ./mlflow.db
        raise InputError(f"{what}: set MLFLOW_TRACKING_URI to the tracking store that "
                         "holds it (e.g. sqlite:///mlruns.db or http://host:5000)")
    return mlflow


def first_line(exc: Exception) -> str:
    """An MLflow error's first line, short: the one-line error's cause."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _download(uri: str) -> str:
    mlflow = require_mlflow(f"--model {uri}")
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its INFO lines on the store
    if not sys.stderr.isatty():  # its download bar: a line of carriage returns in a log
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    folder = tempfile.mkdtemp(prefix="frozenfit-model-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # a copy, not the user's file
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=folder))
    except (mlflow.exceptions.MlflowException, OSError) as exc:  # unknown model/version/run/store
        raise InputError(f"--model {uri}: cannot resolve through MLflow "
                         f"({first_line(exc)}; tracking store {mlflow.get_tracking_uri()})") from None
    files = [local] if local.is_file() else sorted(local.rglob("*.onnx"))
    if not files:
        raise InputError(f"--model {uri}: the MLflow model holds no .onnx file")
    return str(files[0])
