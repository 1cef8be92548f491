"""Runs and models in MLflow: Lightning's MLFlowLogger for params and per-epoch metrics,
MLflow's own `onnx` flavor for the exported model, its Model Registry for versions.

The run folder stays the source of truth (checkpoints, config.yaml, metrics.json,
model.onnx): a non-file logger such as MLFlowLogger is added *after* a CSVLogger that keeps
writing `runs/<name>/version_<n>/`, and at the end of fit the run's files are copied into
the MLflow run as artifacts, the ONNX file as an MLflow model.
"""

from __future__ import annotations

from pathlib import Path

from export.card import Card
from export.errors import InputError

EXTRA = "pip install '.[tracking]' from a checkout, or 'frozenfit[tracking]' from a wheel"
ARTIFACTS = ("config.yaml", "metrics.json", "curves.png", "confusion_matrix.png")
MLFLOW_LOGGER = "lightning.pytorch.loggers.MLFlowLogger"


def split_loggers(logger) -> tuple[object, list]:
    """(the file logger that owns the run folder or None, the other loggers) of a
    `trainer.logger` config value: one class config, a list of them, or True/False/None."""
    items = logger if isinstance(logger, list) else [logger]
    files = [x for x in items if _is_file_logger(x)]
    return (files[0] if files else None), [x for x in items if x is not None and
                                           not _is_file_logger(x) and not isinstance(x, bool)]


def _is_file_logger(item) -> bool:
    args = getattr(item, "init_args", None)
    return args is not None and {"save_dir", "name", "version"} <= set(vars(args))


def is_mlflow(item) -> bool:
    return str(getattr(item, "class_path", "")).split(".")[-1] == "MLFlowLogger"


def run_name(item) -> str:
    """The run folder's name for a non-file logger: MLflow's experiment name."""
    args = getattr(item, "init_args", None)
    return str(getattr(args, "experiment_name", None) or "default")


def check_available(loggers: list) -> None:
    if any(is_mlflow(x) for x in loggers):
        try:
            import mlflow  # noqa: F401
        except ModuleNotFoundError:
            raise InputError(f"--trainer.logger MLFlowLogger needs the tracking extra: "
                             f"{EXTRA}") from None


def flat_config(config: dict, prefix: str = "") -> dict[str, str]:
    """{'model.width': '32', ...}: the resolved config as flat string params."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_config(value, name + "."))
        else:
            out[name] = "" if value is None else str(value)
    return out


def _mlflow_loggers(trainer) -> list:
    return [lg for lg in trainer.loggers if type(lg).__name__ == "MLFlowLogger"]


def card_tags(card: Card) -> dict[str, str]:
    import json

    tags = {"frozenfit.task": card.task,
            "frozenfit.classes": json.dumps(list(card.class_names)),
            "frozenfit.dataset": card.dataset.name,
            "frozenfit.dataset_fingerprint": card.dataset.fingerprint,
            "frozenfit.precision": card.precision,
            "frozenfit.parity_max_abs_diff": str(card.parity and card.parity.max_abs_diff)}
    tags.update({f"frozenfit.metric.{k}": f"{v:.6g}" for k, v in card.metrics.items()})
    return tags


def log_fit(trainer, run_dir: Path, onnx_path: Path | None, example, register_as: str | None):
    """Copy the finished run into every MLflow run of `trainer`: the run folder's files as
    artifacts; the ONNX model with the `onnx` flavor, its signature, an input example and
    the card as metadata and tags; registered as `register_as` if given. Rank 0 only."""
    loggers = _mlflow_loggers(trainer)
    if not loggers or not trainer.is_global_zero:
        return
    import mlflow
    import numpy as np
    import onnx
    import onnxruntime as ort
    from mlflow.models import infer_signature

    from export.card import read_card
    from export.card_text import format_card
    from export.runtime import Predictor

    for logger in loggers:
        client, run_id = logger.experiment, logger.run_id
        for name in ARTIFACTS:
            if (run_dir / name).is_file():
                client.log_artifact(run_id, str(run_dir / name))
        if onnx_path is None or not onnx_path.is_file():
            continue
        card = read_card(onnx_path)
        summary, tags = format_card(card), card_tags(card)
        predictor = Predictor(onnx_path, provider="cpu")
        example = np.ascontiguousarray(example[:5])
        outputs = predictor.session.run(list(card.outputs),
                                        {predictor.session.get_inputs()[0].name: example})
        signature = infer_signature({card.input.name: example},
                                    dict(zip(card.outputs, outputs)))
        mlflow.set_tracking_uri(logger._tracking_uri)  # the logger's store, not the default
        with mlflow.start_run(run_id=run_id):
            info = mlflow.onnx.log_model(
                onnx.load(str(onnx_path)), name="model", signature=signature,
                input_example={card.input.name: example},
                metadata={"frozenfit_card": summary},
                registered_model_name=register_as,
                # One self-contained file, byte for byte the run's model.onnx (card included).
                save_as_external_data=False,
                # Providers this onnxruntime has; MLflow's default names CUDA everywhere.
                onnx_execution_providers=[p for p in ("CUDAExecutionProvider",
                                                      "CPUExecutionProvider")
                                          if p in ort.get_available_providers()])
            mlflow.set_tags(tags)
        if register_as:
            version = info.registered_model_version
            client.update_model_version(register_as, version, description=summary)
            for key, value in tags.items():
                client.set_model_version_tag(register_as, version, key, value)
            print(f"registered {onnx_path} as MLflow model {register_as!r} version {version}")


def track_fit(trainer, datamodule) -> None:
    """The finished run into MLflow, when an MLFlowLogger is configured."""
    from trainer.callbacks import ExportOnnx

    export = next(cb for cb in trainer.callbacks if isinstance(cb, ExportOnnx))
    run_dir = Path(trainer.log_dir or ".")  # a collective under DDP
    if trainer.interrupted:
        return
    example = datamodule.splits["test"].arrays(5)[0]
    log_fit(trainer, run_dir, export.path, example, export.register_as)
