"""The training side's small commands: export (a checkpoint to a gated ONNX graph) and data
(one split of a configured dataset to .npz). Their heavy imports happen inside them."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from export.errors import InputError, check_options
from trainer.cli import check_paths, flag_value


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
    p.add_argument("--calibrate", default="true", choices=["true", "false"],
                   help="classifiers: fit a temperature for the probabilities on half of the "
                   "validation rows (default true); the conformal scores are stored either way")
    p.add_argument("--max-accuracy-drop", type=float, default=0.5,
                   help="INT8: refuse if validation accuracy drops by more percentage points "
                   "than this (default 0.5)")
    args = p.parse_args(argv)
    check_options(("atol", args.atol, args.atol is None or args.atol > 0, "> 0"),
                  ("max-accuracy-drop", args.max_accuracy_drop, args.max_accuracy_drop >= 0,
                   ">= 0 percentage points"))  # NaN too: it failed the gate after the export
    from trainer.callbacks import check_opset

    check_opset(args.opset, "--opset")
    from export.atomic import check_output

    check_output(args.out, "--out", {"--ckpt": args.ckpt, "--samples": args.samples})
    from trainer.freeze import export_checkpoint

    data = Path(args.samples) if args.samples else None  # checked against the card
    card = export_checkpoint(args.ckpt, args.out, data=data, opset=args.opset, atol=args.atol,
                             precision=args.precision, quantize=args.quantize,
                             max_accuracy_drop=args.max_accuracy_drop,
                             allow_trivial=args.allow_trivial,
                             calibrate_t=args.calibrate == "true")
    from export.card_text import gate_lines

    print(f"wrote {args.out} ({card.precision})")
    print("\n".join(gate_lines(card)))
    return 0


def cmd_data(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="trainer data", description=(
        "Write one split of the configured dataset to an .npz (x, y, class_names); any "
        "other options (--config, --data.*) are read as by `trainer fit`."))
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--out", required=True, help=".npz file to write")
    args, rest = p.parse_known_args(argv)
    check_paths(rest)
    from export.atomic import check_output
    from export.tables import root_path
    from trainer.data.cache import cache_root
    from trainer.data.dataset import wide

    # the decoded-row cache is an input too: its index overwritten, the next run would
    # decode every file again
    root, cache = flag_value(rest, "--data.root"), cache_root(flag_value(rest, "--data.cache_dir"))
    check_output(args.out, "--out", {"--config": flag_value(rest, "--config", "-c"),
                                     "--data.root": root_path(root), "--data.cache_dir": cache})
    import zipfile

    import numpy as np

    from export.atomic import atomic_path
    from trainer.lightning_cli import build_cli  # imports Lightning, which sets its log level

    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)  # no Trainer banner: no training
    cli = build_cli(rest, run=False, instantiate=False)
    data = cli.config.data  # what the config files set, before any data is read
    check_output(args.out, "--out", {
        "data.root": root_path(data.root) if data.root != root else None,
        "data.cache_dir": data.cache_dir if cache_root(data.cache_dir) != cache else None})
    if Path(args.out).suffix.lower() != ".npz":  # an .npz named x.txt: predict read a list
        raise InputError(f"--out {args.out}: expected a file name ending in .npz (trainer "
                         "data writes the arrays x, y and class_names)")
    cli.build()
    split = cli.datamodule.splits[args.split]
    n, step = len(split), split.chunk_rows
    # y written as int64 (as before labels were kept narrow), a chunk at a time like x: a
    # split's labels are read through its notes, and 100 million of them are 800 MB wide
    ys = (wide(split.y[a:a + step]) for a in range(0, n, step))
    y_dtype = wide(split.y[:0]).dtype
    try:
        # np.savez's own archive, written with the zip closed on every path: numpy < 2
        # leaves it open when a write fails (a full disk), and its finaliser then prints a
        # traceback at exit. Each array is written chunk by chunk: the split may exceed RAM.
        with atomic_path(args.out) as tmp, zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
            _npy_member(zf, "x", split.x.dtype, (n, *split.x.shape[1:]),
                        (x for x, _ in split.chunks()))
            _npy_member(zf, "y", y_dtype, (n,), ys)
            names = np.array(cli.datamodule.dataset.class_names)
            _npy_member(zf, "class_names", names.dtype, names.shape, [names])
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(args.out)) from None
    print(f"wrote {args.out}: {n} rows of the {args.split} split")
    return 0


def _npy_member(zf, name: str, dtype, shape: tuple, pieces) -> None:
    """`name`.npy in the open archive `zf`, its rows written a piece at a time (what
    np.load reads back; np.savez would need the whole array)."""
    import numpy as np

    with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_2_0(f, {
            "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
            "shape": shape})
        for piece in pieces:
            f.write(np.ascontiguousarray(piece, dtype=dtype).tobytes())
