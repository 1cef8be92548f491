"""The `trainer` command.

fit / validate / test go through LightningCLI (YAML config + dotted overrides,
--print_config). export / predict / inspect / data are small argparse commands whose heavy
imports happen inside them, so `trainer --help`, `predict` and `inspect` never import torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import warnings
from pathlib import Path

from export.errors import InputError
from trainer.stops import (Stopped, after_ctrl_c, ctrl_c_pressed, report_stop,
                           stop_on_sigterm)

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
  serve      HTTP server on LitServe: POST /predict with dynamic batching (extra: serve)
  inspect    show the model card of an ONNX file
  data       write one split of a configured dataset to .npz (input for predict)

Run `trainer COMMAND --help` for the options of one command.
Example: trainer fit --config configs/digits.yaml --trainer.max_epochs 3
"""


def _flag_value(argv: list[str], *names: str) -> str | None:
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def _check_paths(argv: list[str]) -> None:
    """Fail with one line before Lightning starts when a named file does not exist."""
    config = _flag_value(argv, "--config", "-c")
    if config is not None and not Path(config).is_file():
        raise InputError(f"{config}: config file not found")
    ckpt = _flag_value(argv, "--ckpt_path")
    if ckpt is not None and ckpt not in ("last", "best") and not Path(ckpt).is_file():
        raise InputError(f"{ckpt}: checkpoint not found (--ckpt_path expects a file, `last` "
                         f"or `best`)")


def cmd_export(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="trainer export", description=(
        "Freeze a checkpoint to ONNX: eval mode, normalisation inside the graph, dynamic "
        "batch axis, model card in the metadata, onnx.checker and an onnxruntime-vs-torch "
        "parity check on real held-out samples. On any failure nothing is written."))
    p.add_argument("--ckpt", required=True, help="Lightning checkpoint (.ckpt)")
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--samples", help=".npz with held-out 'x' and 'y' to check with (default: "
                   "the test/val/train splits of the checkpoint's own dataset)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16"],
                   help="fp16: float16 weights and activations, for GPU deployment")
    p.add_argument("--quantize", choices=["int8"],
                   help="static INT8 (QDQ) quantization calibrated on training samples")
    p.add_argument("--atol", type=float, default=None, help="max |output difference| "
                   "onnxruntime vs torch (default 1e-3 for fp32, 5e-2 for fp16; INT8 is "
                   "gated by accuracy instead)")
    p.add_argument("--allow-trivial", action="store_true",
                   help="export even a model no better than always giving the validation "
                   "split's most common answer")
    p.add_argument("--max-accuracy-drop", type=float, default=0.5,
                   help="INT8: refuse if validation accuracy drops by more percentage points "
                   "than this (default 0.5)")
    args = p.parse_args(argv)
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= args.opset <= newest:  # below: ONNX's converter fails on our graphs
        raise InputError(f"--opset {args.opset}: expected {MIN_OPSET} to {newest} (this onnx)")
    from export.atomic import check_output

    check_output(args.out, "--out", {"--ckpt": args.ckpt, "--samples": args.samples})
    import numpy as np

    from export.readers import read_arrays
    from trainer.freeze import HeldOut, export_checkpoint

    data = None
    if args.samples:
        x, y = read_arrays(Path(args.samples))
        if y is None and args.quantize:
            raise InputError(f"{args.samples}: --quantize needs labels 'y' to measure accuracy")
        x = np.asarray(x)
        data = HeldOut(x, x, np.zeros(len(x), np.int64) if y is None else y, x)
    card = export_checkpoint(args.ckpt, args.out, data=data, opset=args.opset, atol=args.atol,
                             precision=args.precision, quantize=args.quantize,
                             max_accuracy_drop=args.max_accuracy_drop,
                             allow_trivial=args.allow_trivial)
    from export.card import gate_lines

    print(f"wrote {args.out} ({card['precision']})")
    print("\n".join(gate_lines(card)))
    return 0


def cmd_predict(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="trainer predict", description=(
        "Batch inference with onnxruntime (no torch): one row per input with its id, label "
        "and confidence (or value), a summary JSON and a drift report beside the output."))
    p.add_argument("--model", required=True, help="ONNX file written by trainer export/fit, "
                   "or an MLflow URI: models:/NAME/VERSION, runs:/RUN_ID/model (store from "
                   "MLFLOW_TRACKING_URI; extra: tracking)")
    p.add_argument("--input", required=True, help="a folder (recursive) or .txt list of "
                   "PNG/JPEG images, .csv/.parquet with the model's feature columns, .npz "
                   "with 'x' (and 'y'), .npy, or an IDX images file")
    p.add_argument("--output", required=True, help="predictions .csv, .jsonl or .parquet "
                   "(written atomically); also writes <stem>.summary.json and <stem>.drift.json")
    p.add_argument("--top-k", type=int, default=1, help="also list the k most likely classes")
    p.add_argument("--batch-size", type=int, default=256, help="rows per onnxruntime call")
    p.add_argument("--chunk-rows", type=int, default=8192,
                   help="rows read, predicted and written at a time (bounds memory)")
    p.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--on-error", default="fail", choices=["fail", "skip"],
                   help="an unreadable image fails the job, or is skipped and listed")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted job with the same model, input and options")
    p.add_argument("--timeout-per-batch", type=float, default=600.0, metavar="S",
                   help="fail if one onnxruntime call takes longer than S seconds (default 600)")
    p.add_argument("--threads", type=int, default=0,
                   help="onnxruntime threads (default 0: one per physical core, or one where "
                   "a quick check finds that clearly faster, as for tiny models)")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    p.add_argument("--fail-on-drift", choices=["warn", "drift"],
                   help=f"exit {EXIT_DRIFT} (after writing every output) when the drift report "
                        "reaches this level; an inconclusive report (too few rows) does not")
    ray = p.add_argument_group("more than one machine (--engine ray; extra: ray)")
    ray.add_argument("--engine", default="local", choices=["local", "ray"],
                     help="ray: Ray Data over a folder or glob of Parquet/CSV/.npy/.npz files "
                     "or an image folder; --output is then a folder of Parquet files with "
                     "summary.json and drift.json")
    ray.add_argument("--address", help="join this Ray cluster (auto, ray://host:port); "
                     "default: start a local Ray instance with this machine's cores")
    ray.add_argument("--workers", type=int, help="units run at once, one onnxruntime thread "
                     "each (default: the cluster's CPUs, or its GPUs / --gpus-per-worker)")
    ray.add_argument("--gpus-per-worker", type=float, default=0.0,
                     help="GPU share per worker (e.g. 0.25): the workers are actors on CUDA")
    ray.add_argument("--block-images", type=int, default=4096,
                     help="images per work unit of an image folder")
    args = p.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1 or args.chunk_rows < 1 or args.threads < 0:
        raise InputError("--top-k, --batch-size and --chunk-rows must be >= 1, --threads >= 0")
    if args.engine == "local" and (args.address or args.workers or args.gpus_per_worker):
        raise InputError("--address, --workers and --gpus-per-worker need --engine ray")
    gpus = args.gpus_per_worker
    if (args.workers is not None and args.workers < 1) or not 0 <= gpus < math.inf \
            or (gpus > 1 and gpus != int(gpus)) or args.block_images < 1:
        raise InputError("--workers and --block-images must be >= 1, --gpus-per-worker a "
                         "share of one GPU (0 to 1) or a whole number of GPUs")
    if not args.timeout_per_batch > 0:
        raise InputError("--timeout-per-batch must be > 0 seconds")
    from export.model_uri import resolve_model_uri

    args.model = resolve_model_uri(args.model)
    from export.atomic import check_output
    from export.batch import JobOptions, run_batch

    out = Path(args.output)
    signal.signal(signal.SIGTERM, stop_on_sigterm)  # a scheduler's stop: as Ctrl-C
    job = JobOptions(
        batch_size=args.batch_size, chunk_rows=args.chunk_rows, top_k=args.top_k,
        provider=args.provider, on_error=args.on_error, resume=args.resume,
        progress=not args.no_progress, timeout_per_batch=args.timeout_per_batch,
        threads=args.threads)
    if args.engine == "ray":
        from export.ray_engine import RayOptions, run_ray

        summary = run_ray(args.model, args.input, args.output, job, RayOptions(
            address=args.address, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
            block_images=args.block_images))
    else:
        for path in (out, out.with_name(out.stem + ".summary.json"),
                     out.with_name(out.stem + ".drift.json")):
            check_output(path, "--output", {"--model": args.model, "--input": args.input})
        summary = run_batch(args.model, args.input, args.output, job)
    print(f"predicted {summary['rows']} rows -> {summary['output']} "
          f"({summary['rows_per_second']:,.0f} rows/s over the whole job, reading and writing "
          f"included, on {summary['provider']})")
    if summary["skipped"]:
        print(f"skipped {len(summary['skipped'])} unreadable inputs (listed in the summary):")
        print("\n".join(f"  {s}" for s in summary["skipped"][:10]))
    for metric in ("accuracy", "mae", "rmse"):
        if metric in summary:
            print(f"{metric}: {summary[metric]:.4f}")
    print(summary["drift_table"])
    if args.fail_on_drift:
        from export.drift import reaches

        if reaches(summary["drift_status"], args.fail_on_drift):
            print(f"trainer predict: drift report is {summary['drift_status']} "
                  f"(--fail-on-drift {args.fail_on_drift}); exit {EXIT_DRIFT}", file=sys.stderr)
            return EXIT_DRIFT
    return 0


def cmd_serve(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="trainer serve", description=(
        "Serve an ONNX model over HTTP with onnxruntime (no torch), on LitServe: POST "
        "/predict {\"instances\": [...]} or one raw image body, GET /card /health /metrics. "
        "Concurrent requests are stacked into one onnxruntime call. SIGTERM/SIGINT drain "
        "the requests in flight, then exit 0. Needs: pip install '.[serve]'."))
    p.add_argument("--model", required=True, help="ONNX file written by trainer export/fit, "
                   "or an MLflow URI (models:/NAME/VERSION, runs:/RUN_ID/model)")
    p.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1", "0.0.0.0", "::"],
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1,
                   help="inference processes, each with its own onnxruntime session; the "
                   "cores are shared out between them")
    p.add_argument("--max-batch-size", type=int, default=64,
                   help="requests stacked into one onnxruntime call (1: no batching)")
    p.add_argument("--batch-timeout-ms", type=float, default=5.0,
                   help="longest a request waits for others while a batch is in flight "
                   "(an idle worker takes a request at once)")
    p.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--max-instances", type=int, default=1024, help="instances per request")
    p.add_argument("--max-body-mb", type=float, default=16.0, help="request body limit")
    p.add_argument("--max-queue", type=int, default=512,
                   help="requests in flight at once; more are answered 503")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    for flag in ("workers", "max_batch_size", "max_instances", "max_queue"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be >= 1")
    if not 1024 <= args.port <= 65535:
        raise InputError(f"--port {args.port}: expected 1024 to 65535")
    if args.batch_timeout_ms < 0 or not args.max_body_mb > 0:
        raise InputError("--batch-timeout-ms must be >= 0 and --max-body-mb > 0")
    from export.model_uri import resolve_model_uri
    from export.serve import Limits, ServeOptions, serve

    args.model = resolve_model_uri(args.model)

    from export.timing import available_memory

    held, avail = args.max_queue * args.max_body_mb * (1 << 20), available_memory()
    if avail is not None and held > avail // 2:
        raise InputError(f"--max-queue {args.max_queue} x --max-body-mb {args.max_body_mb:g}: "
                         f"up to {held / 2**30:.1f} GiB of request bodies could be held; at "
                         f"most {avail / 2 / 2**30:.1f} GiB (half of the memory available)")
    limits = Limits(max_body_bytes=int(args.max_body_mb * (1 << 20)),
                    max_instances=args.max_instances, max_queue=args.max_queue)
    return serve(args.model, ServeOptions(
        host=args.host, port=args.port, workers=args.workers, max_batch_size=args.max_batch_size,
        batch_timeout_ms=args.batch_timeout_ms, provider=args.provider, limits=limits,
        log_level=args.log_level))


def cmd_inspect(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="trainer inspect",
                                description="Show the model card stored in an ONNX file.")
    p.add_argument("model", help="ONNX file")
    p.add_argument("--json", action="store_true", help="print the whole card as JSON")
    args = p.parse_args(argv)
    from export.card import format_card, jsonable, read_card

    card = read_card(args.model)
    print(json.dumps(jsonable(card), indent=2) if args.json else format_card(card))
    return 0


def cmd_data(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="trainer data", description=(
        "Write one split of the configured dataset to an .npz (x, y, class_names); any "
        "other options (--config, --data.*) are read as by `trainer fit`."))
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--out", required=True, help=".npz file to write")
    args, rest = p.parse_known_args(argv)
    _check_paths(rest)
    from export.atomic import check_output

    check_output(args.out, "--out", {"--config": _flag_value(rest, "--config", "-c"),
                                     "--data.root": _flag_value(rest, "--data.root")})
    import zipfile

    import numpy as np

    from export.atomic import atomic_path
    from trainer.lightning_cli import build_cli  # imports Lightning, which sets its log level

    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)  # no Trainer banner: no training
    cli = build_cli(rest, run=False)
    split = cli.datamodule.splits[args.split]
    y = split.y
    try:
        # np.savez's own archive, written with the zip closed on every path: numpy < 2
        # leaves it open when a write fails (a full disk), and its finaliser then prints a
        # traceback at exit. x is written chunk by chunk: the split may exceed RAM.
        with atomic_path(args.out) as tmp, zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
            with zf.open("x.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(f, {
                    "descr": np.lib.format.dtype_to_descr(split.x.dtype),
                    "fortran_order": False, "shape": (len(split), *split.x.shape[1:])})
                for x, _ in split.chunks():
                    f.write(np.ascontiguousarray(x).tobytes())
            for name, array in (("y", y), ("class_names",
                                           np.array(cli.datamodule.dataset.class_names))):
                with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(args.out)) from None
    print(f"wrote {args.out}: {len(y)} rows of the {args.split} split")
    return 0


MIN_OPSET = 13  # below, ONNX's version converter ends in an assertion on these graphs
EXIT_DRIFT = 3  # trainer predict --fail-on-drift: the outputs are written, the data drifted

TOOLS = {"export": cmd_export, "predict": cmd_predict, "serve": cmd_serve,
         "inspect": cmd_inspect, "data": cmd_data}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else ""
    # Lightning calling a torch API that torch deprecated (a FutureWarning on some
    # versions, while unpickling a checkpoint too): not the user's to fix.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    try:
        if command in ("", "-h", "--help"):
            print(HELP)
            return 0
        if command in LIGHTNING_COMMANDS:
            _check_paths(argv[1:])
            from trainer.lightning_cli import build_cli, tune_cpu_allocator

            tune_cpu_allocator()
            try:
                build_cli(argv)
            except BaseException as exc:  # SIGTERMException is a SystemExit
                if not ctrl_c_pressed() or isinstance(exc, KeyboardInterrupt):
                    raise
            return after_ctrl_c(argv) if ctrl_c_pressed() else 0
        if command in TOOLS:
            return TOOLS[command](argv[1:])
        raise InputError(f"unknown command {command!r}; expected one of "
                         f"{', '.join(LIGHTNING_COMMANDS + tuple(TOOLS))}")
    except InputError as exc:
        print(f"trainer {command}: error: {exc}".replace("trainer : ", "trainer: "),
              file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # a deploy-only install running a training command
        root = (exc.name or "").split(".")[0]
        if root not in TRAINING_MODULES:
            raise
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
        print(f"trainer {command}: error: {where}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if type(exc).__name__ != "NonFiniteLossError":  # lazily imported with lightning
            raise
        print(f"trainer {command}: error: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Stopped) as exc:
        return report_stop(command, exc)
    except BaseException as exc:
        if type(exc).__name__ != "Preempted":  # lazily imported with lightning
            raise
        print(f"trainer {command}: stopped by SIGTERM before the run finished; `trainer fit "
              f"... --ckpt_path last` completes it", file=sys.stderr)
        return 0
