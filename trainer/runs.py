"""Run folders: which checkpoint `last` / `best` mean, whether a checkpoint may be resumed
under a config, where a run's files go, and what a failed run leaves behind.

A run is `<save_dir>/<name>/version_<n>/` holding `config.yaml`, `checkpoints/` and the
report. One run keeps one folder for its whole life: a resume continues in it, and
`validate` / `test` write their results into its `eval/` sub-folder.
"""

from __future__ import annotations

import inspect
import sys
import warnings
from pathlib import Path

import torch

from export.errors import InputError, require_file
from export.records import is_count
from trainer import configyaml
from trainer.data.info import DataInfo

# Config keys that do not change the weights a run produces (run length, logging, the
# export and report at the end, where the data lives: the data itself is checked by its
# fingerprint), so a resume may change them. Every other key must match the run's own.
RESUMABLE_CHANGES = (
    "ckpt_path", "weights_only", "trainer.max_epochs", "trainer.max_steps", "trainer.max_time",
    "trainer.min_epochs", "trainer.min_steps", "trainer.logger", "trainer.callbacks",
    "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps",
    "trainer.default_root_dir", "trainer.num_sanity_val_steps", "trainer.profiler",
    "data.root", "data.cache_dir", "data.verify_cache", "data.num_workers", "model.init_from", "model.backbone_weights",
    "export", "report", "checkpoint", "last_checkpoint", "nan_guard", "sigterm_checkpoint",
)


def load_checkpoint(path: str | Path, flag: str = "--ckpt", mmap: bool = False) -> dict:
    """Read a trainer checkpoint without executing pickled code (`weights_only`); anything
    else (a missing, truncated or malicious file) is one InputError line naming `flag`.
    `mmap`: map the tensors instead of reading them (a cheap validity check)."""
    path = Path(path)
    require_file(path, "a checkpoint", flag)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # unpickling and zip errors come in many types
        raise InputError(f"{flag} {path}: not a loadable checkpoint ({type(exc).__name__}); "
                         f"only tensors and plain values are read") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt \
            or not isinstance(ckpt.get("hyper_parameters"), dict) \
            or not isinstance(ckpt["hyper_parameters"].get("data_info"), dict):
        raise InputError(f"{flag} {path}: not a trainer checkpoint (no state_dict, "
                         f"hyper_parameters or their data_info)")
    if (odd := _odd_field(ckpt)) is not None:
        raise InputError(f"{flag} {path}: not a trainer checkpoint (its {odd})")
    return ckpt


# What the commands and Lightning's restore read of a checkpoint, by kind: a checkpoint
# edited by hand or written by something else fails here in one line, not in a traceback
# from the code that reads it later (an 'int' object has no attribute 'get').
OPTIONAL = type(None)  # hardware: none chosen (a script's own Trainer); the others: not yet
FIELDS = {"state_dict": dict, "hyper_parameters": dict, "datamodule_hyper_parameters": dict,
          "callbacks": dict, "loops": dict, "metrics": dict, "optimizer_states": list,
          "lr_schedulers": list, "epoch": int, "global_step": int, "rng": dict,
          "hardware": (dict, OPTIONAL), "lr_plan": (dict, OPTIONAL),
          "validated_at_step": (int, OPTIONAL)}


def at(tree, *keys):
    """tree[k1][k2]..., or None where a level is missing or not a mapping."""
    for key in keys:
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def _odd_field(ckpt: dict) -> str | None:
    """What in `ckpt` is not of the kind its readers take, said as a phrase; else None."""
    for key, kind in FIELDS.items():
        if key in ckpt and (not isinstance(ckpt[key], kind) or isinstance(ckpt[key], bool)):
            expected = " or ".join("None" if k is OPTIONAL else k.__name__
                                   for k in (kind if isinstance(kind, tuple) else (kind,)))
            return f"{key!r} is {type(ckpt[key]).__name__}; expected {expected}"
    if not all(isinstance(k, str) and (isinstance(v, torch.Tensor) or k.endswith("_extra_state"))
               for k, v in ckpt["state_dict"].items()):  # a module's get_extra_state: any value
        return "'state_dict' holds other than named tensors"
    if not all(isinstance(v, dict) for v in ckpt.get("callbacks", {}).values()):
        return "'callbacks' holds a state that is not a mapping"
    done = at(ckpt, "loops", "fit_loop", "epoch_progress", "current", "processed")
    if done is not None and not is_count(done):
        return "epochs processed are not a count"
    return None


def run_folder(ckpt: Path) -> Path:
    """The run a checkpoint belongs to (`<run>/checkpoints/x.ckpt`), else its own folder."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def in_run_folder(ckpt: Path) -> bool:
    return ckpt.parent.name == "checkpoints" and (run_folder(ckpt) / "config.yaml").is_file()


def newest_run(root: Path, flag: str) -> Path:
    """The run under `root` (`<save_dir>/<name>`) whose last.ckpt was written last."""
    found = sorted(root.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise InputError(f"--ckpt_path {flag}: no run with a checkpoint under {root}/ "
                         f"(train one with `trainer fit`, or pass a checkpoint file)")
    return run_folder(found[-1])


def best_checkpoint(run: Path) -> Path:
    """The best checkpoint of a run, as its ModelCheckpoint recorded it in last.ckpt."""
    last = run / "checkpoints" / "last.ckpt"
    state = load_checkpoint(last, "--ckpt_path best", mmap=True).get("callbacks", {})
    for value in state.values():
        if value.get("monitor") and value.get("best_model_path"):
            # Stored relative to the trainer's working directory: look beside last.ckpt.
            best = last.parent / Path(value["best_model_path"]).name
            if best.is_file():
                return best
    raise InputError(f"--ckpt_path best: {run} has no best checkpoint (no monitored "
                     f"ModelCheckpoint saved one); use --ckpt_path last or a file")


def resolve_checkpoint(value: str, root: Path) -> Path:
    """`last` / `best` -> that checkpoint of the newest run under `root`; else a file."""
    if value == "last":
        path = newest_run(root, value) / "checkpoints" / "last.ckpt"
    elif value == "best":
        path = best_checkpoint(newest_run(root, value))
    else:
        path = Path(value)
        if not path.is_file():
            raise InputError(f"--ckpt_path {value}: checkpoint not found (expected a file, "
                             f"`last` or `best`)")
    return path.resolve()


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and "class_path" not in value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _averaging(callbacks) -> list:
    """The weight-averaging callbacks of a config: they decide which weights are kept."""
    return [c for c in callbacks or [] if isinstance(c, dict)
            and str(c.get("class_path", "")).endswith("WeightAveraging")]


def saved_config(run: Path) -> dict | None:
    """The options `run` recorded (its config.yaml), None where it has none; InputError
    naming the file where it is not such a record (damaged, or edited by hand)."""
    import yaml

    path = run / "config.yaml"
    if not path.is_file():
        return None
    try:
        saved = configyaml.load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InputError(f"{path}: not the options a run recorded: "
                         f"{configyaml.problem(str(exc))}") from None
    if not isinstance(saved, dict) or any(not isinstance(saved.get(g) or {}, dict)
                                          for g in ("trainer", "model", "data")):
        raise InputError(f"{path}: not the options a run recorded (expected a mapping of "
                         "option groups: trainer, model, data, ...)")
    return saved


def check_same_config(ckpt: Path, current: dict) -> None:
    """Refuse to resume `ckpt` when its run's config.yaml differs from `current` in anything
    that changes the weights (everything but RESUMABLE_CHANGES)."""
    saved = saved_config(run_folder(ckpt))
    if saved is None:
        return  # a loose checkpoint: its hyperparameters are checked on load
    diffs = []
    if _averaging((saved.get("trainer") or {}).get("callbacks")) != \
            _averaging(current.get("trainer", {}).get("callbacks")):
        diffs.append("trainer.callbacks (weight averaging)")
    old, new = _flatten(saved), _flatten(current)
    length = ("trainer.max_epochs", "trainer.max_steps")
    if new.get("model.schedule") == "onecycle" and any(old.get(k) != new.get(k) for k in length):
        raise InputError(
            f"--trainer.max_epochs: the run of {ckpt} used a onecycle schedule planned for "
            f"max_epochs={old.get('trainer.max_epochs')}, which cannot be stretched; to train on "
            f"from its weights start a new run with --model.init_from {ckpt} (or train with "
            f"--model.schedule cosine, which can be extended)")
    for key in sorted(old.keys() | new.keys()):
        if any(key == k or key.startswith(k + ".") for k in RESUMABLE_CHANGES):
            continue
        if old.get(key) != new.get(key):
            diffs.append(f"{key}={old.get(key)!r} in the run, {new.get(key)!r} here")
    if diffs:
        raise InputError(
            f"--ckpt_path: {ckpt} belongs to a run configured differently: {'; '.join(diffs[:3])}"
            f"{' ...' if len(diffs) > 3 else ''}; a resume may change only the epochs (to start a "
            f"new run from its weights use --model.init_from {ckpt})")


def discard_unfinished(log_dir: Path) -> None:
    """Remove what a fit that failed before its first epoch wrote (config, logs), and the
    folder when that leaves it empty. Checkpoints and any other file are kept."""
    if any(log_dir.rglob("*.ckpt")):
        return
    for name in ("config.yaml", "hparams.yaml", "metrics.csv"):
        (log_dir / name).unlink(missing_ok=True)
    for folder in (log_dir / "checkpoints", log_dir):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def keep_previous_log(log_dir: Path) -> None:
    """Lightning's CSVLogger deletes an existing metrics.csv: a resumed run keeps the log of
    its earlier part(s) as metrics-part<k>.csv beside the new one."""
    log = log_dir / "metrics.csv"
    if log.is_file():
        k = 1 + sum(1 for _ in log_dir.glob("metrics-part*.csv"))
        log.rename(log_dir / f"metrics-part{k}.csv")


# ---------------------------------------------------------------- reading a checkpoint
def check_same_rows(theirs: DataInfo | None, ours: DataInfo, fitting: bool) -> None:
    """A checkpoint is loaded for the data it learned from, and (`fitting`: a resume) split
    the same way (a version that split copies of a file apart drew other sizes)."""
    old_fp, new_fp = theirs and theirs.dataset.fingerprint, ours.dataset.fingerprint
    warm = "use --model.init_from CKPT to warm-start from its weights instead"
    need = (f"resume needs the same data ({warm})" if fitting else "it is evaluated on the data "
            "it learned from; to score other labelled data, export it and run trainer predict")
    if old_fp != new_fp:
        raise InputError(f"--ckpt_path: the checkpoint was trained on dataset fingerprint "
                         f"{str(old_fp)[:12]}, the configured data has {new_fp[:12]}; {need}")
    old, new = theirs.dataset.split_sizes, ours.dataset.split_sizes
    if fitting and old and new and old != new:
        raise InputError(f"--ckpt_path: the checkpoint's splits were {old}, this data splits "
                         f"into {new}; resume needs the same split ({warm})")


def checkpoint_data(ckpt: dict, source: str = "checkpoint") -> DataInfo:
    """What the checkpoint's model learned about its data (its `data_info`)."""
    return DataInfo.read(ckpt.get("hyper_parameters", {}).get("data_info"), source)


def init_args(ckpt: dict, key: str, cls: type | None = None) -> dict:
    """Constructor arguments saved under `key` (none where it is absent), without
    LightningCLI's private entries; with `cls`, each an option `cls` takes (a checkpoint of
    another version, or edited by hand, may hold others: a TypeError in the constructor)."""
    saved = ckpt.get(key, {})
    if not isinstance(saved, dict) or not all(isinstance(k, str) for k in saved):
        raise InputError(f"checkpoint field {key!r}: expected a mapping of option names to "
                         f"values, got {type(saved).__name__}")
    args = {k: v for k, v in saved.items() if not k.startswith("_")}
    known = inspect.signature(cls).parameters if cls is not None else args
    if (odd := next((k for k in args if k not in known), None)) is not None:
        raise InputError(f"checkpoint field '{key}.{odd}': not an option of {cls.__name__} "
                         "(a checkpoint of another version, or edited by hand)")
    return args


def from_checkpoint(cls: type, ckpt: dict, key: str, **given):
    """cls(**the options saved under `key`, updated with `given`). A value of another type
    than its option takes (a checkpoint edited by hand) fails the options' checks as a
    TypeError or AttributeError: one line naming `key`."""
    try:
        return cls(**{**init_args(ckpt, key, cls), **given})
    except (TypeError, AttributeError) as exc:
        raise InputError(f"checkpoint field {key!r}: a value {cls.__name__} cannot take "
                         f"({type(exc).__name__}: {exc})") from exc


def loadable_state(module: torch.nn.Module, state_dict: dict) -> dict:
    """`state_dict` completed by `module`'s own (empty) metric states where it lacks them
    (checkpoints written before a metric existed still load strictly). A tensor of another
    shape than the module's (a checkpoint edited by hand: its hyperparameters name the same
    architecture) is one line here, not load_state_dict's RuntimeError traceback."""
    ours = module.state_dict()

    def shape(value) -> list[int] | None:  # None: a module's extra state, not a tensor
        return list(value.shape) if isinstance(value, torch.Tensor) else None

    for key, value in state_dict.items():
        if key in ours and shape(value) != shape(ours[key]):
            raise InputError(f"checkpoint field 'state_dict.{key}': shape {shape(value)}; the "
                             f"model its hyper_parameters describe has {shape(ours[key])}")
    own = {k: v for k, v in ours.items()
           if k.startswith(("train_loss.", "metrics.", "test_confusion."))}
    return {**own, **state_dict}


def checkpoint_metrics(ckpt: dict) -> dict[str, float]:
    """Metrics logged in the epoch the checkpoint was saved, plus the best monitored scores
    recorded by ModelCheckpoint callbacks."""
    out = {k: v for k, v in ckpt.get("metrics", {}).items()
           if isinstance(k, str) and not k.endswith("_step")}
    for state in ckpt.get("callbacks", {}).values():
        score, monitor = state.get("best_model_score"), state.get("monitor")
        try:
            value = float(score) if monitor and score is not None else None
        except (TypeError, ValueError, RuntimeError):  # not one number: edited by hand
            value = None
        if value is not None:
            out[f"best_{monitor}"] = value
    return out


def run_config(ckpt_path: Path) -> str | None:
    """The resolved config.yaml of the run the checkpoint belongs to, if it is beside it."""
    config = ckpt_path.parent.parent / "config.yaml"
    return config.read_text() if config.is_file() else None


def epochs_trained(ckpt: dict) -> int:
    """Training epochs the weights have seen (`epoch` alone is off by one after fit ends)."""
    done = at(ckpt, "loops", "fit_loop", "epoch_progress", "current", "processed")
    return int(done) if done is not None else int(ckpt.get("epoch", -1)) + 1


def run_epochs(ckpt: dict, ckpt_path: Path) -> int:
    """Epochs the whole run had trained: its last.ckpt's count when it lies beside."""
    last = ckpt_path.parent / "last.ckpt"
    if last.is_file() and last.resolve() != ckpt_path.resolve():
        try:  # memory-mapped: only the loop counters are read
            return max(epochs_trained(torch.load(last, map_location="cpu", weights_only=True,
                                                  mmap=True)), epochs_trained(ckpt))
        except Exception:  # an unreadable neighbour says nothing about this checkpoint
            pass
    return epochs_trained(ckpt)


# ---------------------------------------------------------------- a command's checkpoint

def open_checkpoint(value: str, root: Path, command: str) -> tuple[Path, dict]:
    """--ckpt_path resolved (`last` / `best` of the newest run under `root`) and read
    (memory-mapped); says which checkpoint it is and how far it had trained."""
    ckpt = resolve_checkpoint(value, root)
    state = load_checkpoint(ckpt, "--ckpt_path", mmap=True)
    done = at(state, "loops", "fit_loop", "epoch_progress", "current", "processed")
    print(f"{command}: checkpoint {ckpt}" + (
        f" ({done} complete epochs, step {state.get('global_step')})"
        if done is not None else ""), file=sys.stderr)
    return ckpt, state


def check_new_version(logger, root: Path) -> None:
    """A fit told `--trainer.logger.version` of a run that exists would write its
    checkpoints, config.yaml and model.onnx over that run's (only a resume continues one)."""
    if logger is None or logger.version is None:
        return
    version = logger.version
    run = root / (version if isinstance(version, str) else f"version_{version}")
    if run.is_dir() and any(run.iterdir()):
        raise InputError(f"--trainer.logger.version {version}: {run} holds a run already, "
                         f"which this fit would overwrite; resume it (--ckpt_path "
                         f"{run / 'checkpoints' / 'last.ckpt'}) or leave the version out")


def continue_in_run(logger, run: Path, root: Path) -> None:
    """Point the file logger of a resumed fit at the run's own folder."""
    if run.parent != root.resolve():  # a run under another save_dir/name
        logger.save_dir, logger.name = str(run.parent.parent), run.parent.name
    # Else keep save_dir as configured: ModelCheckpoint restores its best-k state only
    # when the checkpoint folder is spelled as it was.
    logger.version = run.name
    keep_previous_log(run)
    # the run's own checkpoints are there, as they should be on a resume
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


def take_run_data(data, run: Path, argv: list[str], command: str) -> None:
    """validate/test evaluate the checkpoint on its run's data: the data options of the
    run's config.yaml, except those given on the command line."""
    saved = run / "config.yaml"
    try:
        recorded = (saved_config(run) or {}).get("data") or {}
    except InputError:
        return  # what the command line and the config give is evaluated
    given = {a[2:].split("=", 1)[0] for a in argv if a.startswith("--data.")}
    taken = [k for k, v in recorded.items()
             if f"data.{k}" not in given and k in data and data[k] != v]
    for key in taken:
        data[key] = recorded[key]
    if taken:
        print(f"{command}: the run's data ({', '.join(f'data.{k}' for k in taken)} from "
              f"{saved})", file=sys.stderr)


def eval_version(run: Path, command: str, ckpt: Path) -> str:
    """The sub-folder of `run` an evaluation writes into: `eval/<command>-<checkpoint>`, or
    `-2`, `-3`... after it when an earlier evaluation is there (its results are kept)."""
    base = name = f"eval/{command}-{ckpt.stem}"
    n = 1
    while (run / name).exists():
        n += 1
        name = f"{base}-{n}"
    return name
