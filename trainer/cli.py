"""The `trainer` command.

fit / validate / test go through LightningCLI (YAML config + dotted overrides,
--print_config). export / predict / inspect / data are small argparse commands whose heavy
imports happen inside them, so `trainer --help`, `predict` and `inspect` never import torch.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path

from export.errors import InputError
from trainer.stops import Preempted, Stopped, after_ctrl_c, ctrl_c_pressed, report_stop

LIGHTNING_COMMANDS = ("fit", "validate", "test")
# What the `train` extra brings; the deploy side (predict, inspect) needs none of it.
TRAINING_MODULES = {"torch", "torchvision", "lightning", "torchmetrics", "jsonargparse",
                    "onnxscript", "sklearn", "matplotlib"}

HELP = """usage: trainer COMMAND [options]

Offline learning on a fixed dataset: fit with Lightning, freeze to ONNX, predict with
onnxruntime (no torch needed to predict).

training (LightningCLI: --config FILE.yaml, dotted overrides, --print_config):
  fit        train for N full epochs; writes runs/<name>/version_<n>/ and model.onnx
  validate   evaluate a checkpoint on the validation split (--ckpt_path)
  test       evaluate a checkpoint on the test split (--ckpt_path)

deployment:
  export     checkpoint -> frozen ONNX with model card, behind a parity gate
  predict    batch inference with onnxruntime: inputs -> predictions CSV
  serve      HTTP server on uvicorn: POST /predict with dynamic batching (extra: serve)
  inspect    show the model card of an ONNX file
  compare    champion vs challenger on the same labelled rows, with a paired test
  promote    move an MLflow registry alias to a version through that gate, or roll back
  data       write one split of a configured dataset to .npz (input for predict)

Run `trainer COMMAND --help` for the options of one command. `--debug` (or
FROZENFIT_DEBUG=1) prints the traceback behind a one-line error.
Example: trainer fit --config configs/digits.yaml --trainer.max_epochs 3
"""


def flag_value(argv: list[str], *names: str) -> str | None:
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def check_paths(argv: list[str]) -> None:
    """Fail with one line before Lightning starts when a named file does not exist."""
    config = flag_value(argv, "--config", "-c")
    if config is not None and not Path(config).is_file():
        raise InputError(f"{config}: config file not found")
    ckpt = flag_value(argv, "--ckpt_path")
    if ckpt is not None and ckpt not in ("last", "best") and not Path(ckpt).is_file():
        raise InputError(f"{ckpt}: checkpoint not found (--ckpt_path expects a file, `last` "
                         f"or `best`)")


# command -> (module, function): imported when run, so `trainer --help` stays quick and the
# deploy commands never import the training side.
TOOLS = {"export": ("trainer.train_commands", "cmd_export"),
         "data": ("trainer.train_commands", "cmd_data"),
         "predict": ("trainer.deploy_commands", "cmd_predict"),
         "serve": ("trainer.deploy_commands", "cmd_serve"),
         "inspect": ("trainer.deploy_commands", "cmd_inspect"),
         "compare": ("trainer.model_commands", "cmd_compare"),
         "promote": ("trainer.model_commands", "cmd_promote")}


def _run(command: str, argv: list[str]) -> int:
    if command in ("", "-h", "--help"):
        print(HELP)
        return 0
    if command in LIGHTNING_COMMANDS:
        check_paths(argv[1:])
        from trainer.allocator import tune_cpu_allocator
        from trainer.lightning_cli import build_cli

        tune_cpu_allocator()
        try:
            build_cli(argv)
        except BaseException as exc:  # SIGTERMException is a SystemExit
            if not ctrl_c_pressed() or isinstance(exc, KeyboardInterrupt):
                raise
        return after_ctrl_c(argv) if ctrl_c_pressed() else 0
    if command in TOOLS:
        module, function = TOOLS[command]
        return getattr(importlib.import_module(module), function)(argv[1:])
    raise InputError(f"unknown command {command!r}; expected one of "
                     f"{', '.join(LIGHTNING_COMMANDS + tuple(TOOLS))}")


def _debug(exc: BaseException) -> None:
    """With --debug or FROZENFIT_DEBUG=1: the traceback behind a one-line error, first."""
    if DEBUG["on"]:
        exc.__suppress_context__ = False  # `raise ... from None` hid the cause: show it
        traceback.print_exception(exc, file=sys.stderr)


DEBUG = {"on": False}


def main(argv: list[str] | None = None) -> int:
    """Run one `trainer` command; every failure a user can cause is one line and a status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    DEBUG["on"] = "--debug" in argv or os.environ.get("FROZENFIT_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    command = argv[0] if argv else ""
    if DEBUG["on"]:  # the deploy side's and the libraries' debug logs too
        logging.basicConfig(format="%(name)s: %(message)s", level=logging.DEBUG)
    # Lightning calling a torch API that torch deprecated (a FutureWarning on some
    # versions, while unpickling a checkpoint too): not the user's to fix.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    try:
        return _run(command, argv)
    except InputError as exc:
        _debug(exc)
        print(f"trainer {command}: error: {exc}".replace("trainer : ", "trainer: "),
              file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # a deploy-only install running a training command
        root = (exc.name or "").split(".")[0]
        if root not in TRAINING_MODULES:
            raise
        _debug(exc)
        print(f"trainer {command}: error: needs the training extra (missing module {root}): "
              f"pip install '.[train]' from a checkout, or 'frozenfit[train]' from a wheel",
              file=sys.stderr)
        return 2
    except BrokenPipeError:  # `trainer inspect --json | head -1`: the reader has gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        return 141
    except OSError as exc:  # a full disk, a read-only folder, a parent that is a file, ...
        if exc.errno is None:
            raise
        where = exc.filename or "output"
        _debug(exc)
        print(f"trainer {command}: error: {where}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if type(exc).__name__ != "NonFiniteLossError":  # lazily imported with lightning
            raise
        _debug(exc)
        print(f"trainer {command}: error: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Stopped) as exc:
        return report_stop(command, exc)
    except Preempted:
        print(f"trainer {command}: stopped by SIGTERM before the run finished; `trainer fit "
              f"... --ckpt_path last` completes it", file=sys.stderr)
        return 0


def run() -> None:
    """The `trainer` executable and `python -m trainer`: `main()`, then the process ends."""
    exit_process(main())


def exit_process(code: int) -> None:
    """End the process with `code`. After a command that imported torch, the interpreter's
    own shutdown (freeing every module and object of torch and Lightning) takes seconds and
    does nothing a user needs (docs/benchmarks.md: the time after `time:`). So: wait for
    the threads a normal exit waits for, run the atexit handlers (logging, multiprocessing's
    children, MLflow's queue, temporary folders), flush the standard streams, then leave
    at once. In-process callers (tests, trainer.api) use `main()` and never get here."""
    if "torch" not in sys.modules:
        sys.exit(code)
    import atexit
    import threading

    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # what Py_Finalize runs first; not the module teardown after it
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing left to tell it
            pass
    os._exit(code)
