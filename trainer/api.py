"""`trainer fit` for Python scripts, in the script's own process.

    from trainer import api
    result = api.fit("configs/digits.yaml", trainer={"max_epochs": 3}, model={"width": 16})
    print(result.model, result.metrics["test"])

The same parser, checks, hardware choice, checkpoints, export gates and run folder as the
command: the config file and the sections are handed to the command's LightningCLI, the
sections as a second config file, which overrides the first as a later `--config` does.
Bad input raises `export.errors.InputError`, whose message is the command's one line.

To build the pieces yourself under your own `lightning.Trainer` instead, see
examples/plain_trainer.py and examples/custom_backbone.py.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from export.errors import InputError

VALUES = ("seed_everything", "ckpt_path")  # the sections that are values; the rest: GROUPS


@dataclass(frozen=True)
class FitResult:
    """What a fit left: its run folder, the exported model (None when export was off or
    the run stopped early), the best checkpoint, and metrics.json as a dict."""

    run: Path
    model: Path | None
    checkpoint: Path | None
    metrics: dict


def fit(config: str | Path | None = None, *, args: list[str] | tuple[str, ...] = (),
        **sections) -> FitResult:
    """Run `trainer fit [--config CONFIG] [sections] [args]` in this process.

    config: a YAML config file, as `--config`.
    sections: the config's top-level keys as mappings (trainer=..., model=..., data=...,
        export=..., checkpoint=...) or values (seed_everything=0, ckpt_path="last").
    args: further command-line flags, as the command takes them
        (e.g. ["--trainer.callbacks+=EMAWeightAveraging"]).
    """
    from trainer import stops
    from trainer.allocator import tune_cpu_allocator
    from trainer.cli import check_paths
    from trainer.lightning_cli import GROUPS, build_cli

    unknown = sorted(set(sections) - {*GROUPS, *VALUES})
    if unknown:
        raise InputError(f"api.fit: unknown section(s) {unknown}; expected any of "
                         f"{[*GROUPS, *VALUES]}")
    if isinstance(args, str) or not all(isinstance(a, str) for a in args):
        raise InputError(f"api.fit: args must be a list of command-line strings, such as "
                         f"['--trainer.max_epochs', '3']; got {args!r:.60}")
    argv = ["fit"] + (["--config", str(config)] if config is not None else [])
    with tempfile.TemporaryDirectory(prefix="trainer-api-") as tmp, stops.fit_signals():
        if sections:
            extra = Path(tmp) / "sections.yaml"
            try:
                extra.write_text(yaml.safe_dump(json.loads(json.dumps(sections, default=str))))
            except (TypeError, ValueError) as exc:
                raise InputError(f"api.fit: the sections must be plain values (numbers, "
                                 f"strings, lists, mappings): {exc}") from None
            argv += ["--config", str(extra)]
        argv += list(args)
        check_paths(argv[1:])
        tune_cpu_allocator()
        try:
            cli = build_cli(argv)
        except InputError as exc:  # the sections' file is ours: name what the user passed
            raise InputError(str(exc).replace(str(Path(tmp) / "sections.yaml"),
                                              "api.fit's keyword sections")) from None
        except BaseException:  # Lightning's SIGTERMException is a SystemExit
            if not stops.ctrl_c_pressed():
                raise
        if stops.ctrl_c_pressed():  # the script's Ctrl-C, once the fit saved where it was
            kept = stops.kept_checkpoint()
            raise KeyboardInterrupt(f"api.fit: interrupted; kept {kept}; resume with "
                                    "ckpt_path='last'" if kept else
                                    "api.fit: interrupted; no checkpoint was saved")
    trainer = cli.trainer
    run = Path(trainer.log_dir or trainer.default_root_dir).absolute()
    export = next((cb for cb in trainer.callbacks if type(cb).__name__ == "ExportOnnx"), None)
    best = [cb.best_model_path for cb in trainer.checkpoint_callbacks
            if getattr(cb, "monitor", None) and cb.best_model_path]
    summary = run / "metrics.json"
    return FitResult(run=run, model=Path(export.path).absolute() if export and export.path else None,
                     checkpoint=Path(best[0]).absolute() if best else None,
                     metrics=json.loads(summary.read_text()) if summary.is_file() else {})
