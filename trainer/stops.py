"""How a command stops when asked to: SIGTERM during a batch job behaves like Ctrl-C, and a
fit stopped by Ctrl-C says which checkpoint it kept and the command that resumes it."""

from __future__ import annotations

import shlex
import sys


class Stopped(BaseException):
    """SIGTERM during a batch job: stop like Ctrl-C (complete parts stay for --resume)."""


def stop_on_sigterm(*_) -> None:
    raise Stopped()


def ctrl_c_pressed() -> bool:
    from trainer.lightning_cli import CTRL_C

    return CTRL_C["pressed"]


def after_ctrl_c(argv: list[str]) -> int:
    """After a Ctrl-C stopped a fit: the checkpoint kept and the command that resumes it."""
    from trainer.callbacks import CheckpointOnSigterm

    args = [a for i, a in enumerate(argv) if a != "--ckpt_path" and
            (i == 0 or argv[i - 1] != "--ckpt_path") and not a.startswith("--ckpt_path=")]
    kept = CheckpointOnSigterm.saved
    print(f"trainer {argv[0]}: interrupted; "
          + (f"kept {kept}; resume with: trainer {shlex.join(args)} --ckpt_path last"
             if kept else "no checkpoint was saved"), file=sys.stderr)
    return 130


def report_stop(command: str, exc: BaseException) -> int:
    """One line for a command stopped by Ctrl-C or SIGTERM, and its exit status."""
    name = "SIGTERM" if isinstance(exc, Stopped) else "SIGINT"
    if command == "predict":
        print(f"trainer predict: stopped by {name}; the complete parts are kept: run the "
              f"same command with --resume to finish", file=sys.stderr)
    else:
        print(f"trainer {command}: interrupted", file=sys.stderr)
    return 143 if name == "SIGTERM" else 130
