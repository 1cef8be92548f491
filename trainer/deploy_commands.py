"""The deploy side's commands: predict, serve, inspect. They need numpy, onnxruntime and
pillow (plus the serve, ray or tracking extras where named), never torch."""

from __future__ import annotations

import argparse
import json
import signal
import sys

from export.errors import InputError
from trainer.stops import stop_on_sigterm

EXIT_DRIFT = 3  # trainer predict --fail-on-drift: the outputs are written, the data drifted


def predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trainer predict", description=(
        "Batch inference with onnxruntime (no torch): one row per input with its id, label "
        "and confidence (or value), a summary JSON and a drift report beside the output."))
    p.add_argument("--model", required=True, help="ONNX file written by trainer export/fit, "
                   "or an MLflow URI: models:/NAME/VERSION, runs:/RUN_ID/model (store from "
                   "MLFLOW_TRACKING_URI; extra: tracking)")
    p.add_argument("--input", required=True, help="a folder (recursive) or .txt list of "
                   "PNG/JPEG images, .csv/.parquet (or a folder or glob of them, read as one "
                   "table) with the model's feature columns, .npz with 'x' (and 'y'), .npy, "
                   "or an IDX images file")
    p.add_argument("--output", required=True, help="predictions .csv, .jsonl or .parquet "
                   "(written atomically); also writes <stem>.summary.json and <stem>.drift.json")
    p.add_argument("--top-k", type=int, default=1, help="also list the k most likely classes")
    p.add_argument("--coverage", type=float, metavar="C", help="add conformal prediction "
                   "sets (prediction_set, set_size) or intervals (lower, upper) that hold the "
                   "true answer with probability >= C, e.g. 0.9; with labels the summary "
                   "reports the coverage reached")
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
    return p


def cmd_predict(argv: list[str]) -> int:
    args = predict_parser().parse_args(argv)
    if args.engine == "local" and (args.address or args.workers or args.gpus_per_worker):
        raise InputError("--address, --workers and --gpus-per-worker need --engine ray")
    from export.batch import JobOptions, run_batch

    job = JobOptions(
        batch_size=args.batch_size, chunk_rows=args.chunk_rows, top_k=args.top_k,
        provider=args.provider, on_error=args.on_error, resume=args.resume,
        progress=not args.no_progress, timeout_per_batch=args.timeout_per_batch,
        threads=args.threads, coverage=args.coverage)
    from export.model_uri import resolve_model_uri

    args.model = resolve_model_uri(args.model)
    signal.signal(signal.SIGTERM, stop_on_sigterm)  # a scheduler's stop: as Ctrl-C
    if args.engine == "ray":
        from export.ray_engine import RayOptions, run_ray

        ray = RayOptions(address=args.address, workers=args.workers,
                         gpus_per_worker=args.gpus_per_worker, block_images=args.block_images)
        summary = run_ray(args.model, args.input, args.output, job, ray)
    else:
        summary = run_batch(args.model, args.input, args.output, job)
    print_summary(summary)
    if args.fail_on_drift:
        from export.drift import reaches

        if reaches(summary.drift_status, args.fail_on_drift):
            print(f"trainer predict: drift report is {summary.drift_status} "
                  f"(--fail-on-drift {args.fail_on_drift}); exit {EXIT_DRIFT}", file=sys.stderr)
            return EXIT_DRIFT
    return 0


def print_summary(summary) -> None:
    """The job's summary (export.summary.JobSummary) as the command's report."""
    print(f"predicted {summary.rows} rows -> {summary.output} "
          f"({summary.rows_per_second:,.0f} rows/s over the whole job, reading and writing "
          f"included, on {summary.provider})")
    if summary.skipped:
        print(f"skipped {len(summary.skipped)} unreadable inputs (listed in the summary):")
        print("\n".join(f"  {s}" for s in summary.skipped[:10]))
    for metric in ("accuracy", "mae", "rmse", "coverage", "mean_set_size",
                   "mean_interval_width"):
        if metric in summary.metrics:
            print(f"{metric}: {summary.metrics[metric]:.4f}")
    print(summary.drift_table)


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trainer serve", description=(
        "Serve an ONNX model over HTTP with onnxruntime (no torch), on uvicorn: POST "
        "/predict {\"instances\": [...]} or one raw image body, GET /card /health /metrics. "
        "Concurrent requests are stacked into one onnxruntime call. SIGTERM/SIGINT drain "
        "the requests in flight, then exit 0; SIGHUP reloads the model file. Needs: pip "
        "install '.[serve]'."))
    p.add_argument("--model", required=True, help="ONNX file written by trainer export/fit, "
                   "or an MLflow URI (models:/NAME/VERSION, runs:/RUN_ID/model)")
    p.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1", "0.0.0.0", "::"],
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=None,
                   help="API server processes (uvicorn, sharing the port), each with its "
                   "own onnxruntime session; the cores are shared out between them "
                   "(default: one per 8 usable cores, one on CUDA)")
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
    p.add_argument("--api-key-file", metavar="FILE", help="require this key (the file's "
                   "first line) as 'Authorization: Bearer KEY' or 'X-API-Key: KEY' on every "
                   "route but the health checks; default: FROZENFIT_API_KEY if set")
    p.add_argument("--poll-s", type=float, default=0.0, help="with --model "
                   "models:/NAME@ALIAS: check the alias every POLL_S seconds and, when it "
                   "moves, swap the new version in without a restart (default 0: never)")
    p.add_argument("--name", help="the model's name on the Open Inference Protocol routes "
                   "(/v2/models/NAME/infer; default: a models:/ URI's registered name, else the model "
                   "file's stem)")
    return p


def cmd_serve(argv: list[str]) -> int:
    args = serve_parser().parse_args(argv)
    from export.model_uri import registry_alias, resolve_model_uri, served_version
    from export.serve.options import Limits, ServeOptions, read_api_key
    from export.serve.supervisor import serve

    options = ServeOptions(
        host=args.host, port=args.port, workers=args.workers, max_batch_size=args.max_batch_size,
        batch_timeout_ms=args.batch_timeout_ms, provider=args.provider, log_level=args.log_level,
        name=args.name, api_key=read_api_key(args.api_key_file), uri=args.model,
        poll_s=args.poll_s,
        limits=Limits(max_body_bytes=args.max_body_mb * (1 << 20),
                      max_instances=args.max_instances, max_queue=args.max_queue))
    version = served_version(args.model)  # an alias pinned first: it may move meanwhile
    alias = registry_alias(args.model)
    pinned = f"models:/{alias[0]}/{version}" if alias else args.model
    return serve(resolve_model_uri(pinned), options, version)


def cmd_inspect(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="trainer inspect",
                                description="Show the model card stored in an ONNX file.")
    p.add_argument("model", help="ONNX file, or models:/NAME/VERSION, models:/NAME@ALIAS, "
                   "runs:/ID/model from MLflow (store from MLFLOW_TRACKING_URI)")
    p.add_argument("--json", action="store_true", help="print the whole card as JSON")
    args = p.parse_args(argv)
    from export.card import jsonable, read_card
    from export.card_text import format_card
    from export.model_uri import resolve_model_uri

    card = read_card(resolve_model_uri(args.model))
    print(json.dumps(jsonable(card), indent=2) if args.json else format_card(card))
    return 0
