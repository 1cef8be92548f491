"""`--model models:/NAME/VERSION` or `runs:/RUN_ID/model`: an ONNX file kept in MLflow,
downloaded through MLflow's own client (tracking store from MLFLOW_TRACKING_URI) for
`trainer predict` and `trainer serve`. Torch-free; MLflow is the `tracking` extra."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
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


def _download(uri: str) -> str:
    try:
        import mlflow
    except ModuleNotFoundError:
        raise InputError(f"--model {uri}: resolving MLflow URIs needs the tracking extra: "
                         f"{EXTRA}") from None
    if not os.environ.get("MLFLOW_TRACKING_URI"):  # MLflow's default creates ./mlflow.db
        raise InputError(f"--model {uri}: set MLFLOW_TRACKING_URI to the tracking store that "
                         "holds it (e.g. sqlite:///mlruns.db or http://host:5000)")
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its INFO lines on the store
    folder = tempfile.mkdtemp(prefix="frozenfit-model-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # a copy, not the user's file
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=folder))
    except (mlflow.exceptions.MlflowException, OSError) as exc:  # unknown model/version/run/store
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise InputError(f"--model {uri}: cannot resolve through MLflow "
                         f"({first}; tracking store {mlflow.get_tracking_uri()})") from None
    files = [local] if local.is_file() else sorted(local.rglob("*.onnx"))
    if not files:
        raise InputError(f"--model {uri}: the MLflow model holds no .onnx file")
    return str(files[0])
