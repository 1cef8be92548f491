"""Champion and challenger: `trainer compare` (may a retrained model replace the deployed
one?) and `trainer promote` (move a registry alias through that gate, or back). Torch-free:
numpy, scipy and onnxruntime, and MLflow (the tracking extra) for registry models."""

from __future__ import annotations

import argparse
import json

from export.errors import InputError

EXIT_NOT_MET = 1  # the challenger does not meet --require; nothing was moved


def _gate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--require", default="not-worse", choices=["better", "not-worse"],
                   help="what the challenger must be (default not-worse)")
    p.add_argument("--alpha", type=float, default=0.05,
                   help="one-sided error rate of the test and of each bound (default 0.05)")
    p.add_argument("--margin", type=float, default=0.0,
                   help="non-inferiority margin in the metric's units: accuracy as a fraction "
                   "(0.01 is one point) or MAE (default 0)")
    p.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda"])


def _compare(champion: str, challenger: str, data: str, args, names=None):
    """Both models resolved (MLflow URIs downloaded), compared, the table printed."""
    from export.card import read_card
    from export.compare import format_comparison, lineage_line, run_compare
    from export.model_uri import resolve_model_uri

    names = names or (champion, challenger)
    paths = resolve_model_uri(champion), resolve_model_uri(challenger)
    result = run_compare(*paths, data, alpha=args.alpha, margin=args.margin,
                         provider=args.provider, names=names)
    for role, name, path in zip(("champion", "challenger"), names, paths):
        print(f"{role}: {name}: {lineage_line(read_card(path))}")
    print(format_comparison(result, names))
    return result, paths


def cmd_compare(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="trainer compare", description=(
        "Score two models on the same labelled rows through the deployed path and test the "
        "difference (classifiers: exact McNemar on the rows only one gets right; regressors: "
        "paired bootstrap of the MAE difference). Exit 0 when the challenger meets "
        "--require, 1 when it does not, 2 on bad input."))
    p.add_argument("--champion", required=True, help="the deployed model: an ONNX file, "
                   "models:/NAME/VERSION, models:/NAME@ALIAS or runs:/ID/model")
    p.add_argument("--challenger", required=True, help="the candidate, as --champion")
    p.add_argument("--data", required=True, help="labelled rows, any input trainer predict "
                   "reads (an .npz with y, a table with the target column, class folders)")
    p.add_argument("--json", dest="report", help="also write the report as JSON")
    _gate_options(p)
    args = p.parse_args(argv)
    if args.report:
        from export.atomic import check_output

        check_output(args.report, "--json", {"--data": args.data, "--champion": args.champion,
                                             "--challenger": args.challenger})
    from export.compare import meets

    result, paths = _compare(args.champion, args.challenger, args.data, args)
    ok = meets(result.verdict, args.require)
    if args.report:
        _write_report(args.report, {
            "champion": args.champion, "challenger": args.challenger, "data": args.data,
            "require": args.require, "meets": ok, "comparison": result.to_json()})
    print(f"--require {args.require}: {'met' if ok else 'NOT met'}")
    return 0 if ok else EXIT_NOT_MET


def _write_report(path: str, doc: dict) -> None:
    from export.atomic import atomic_path
    from export.card import jsonable

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(jsonable(doc), indent=2))


def cmd_promote(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="trainer promote", description=(
        "Move an MLflow registry alias to a model version (store from MLFLOW_TRACKING_URI). "
        "With --data, the version must first pass trainer compare against the alias's "
        "current holder; every move is recorded on the registered model, and --rollback "
        "puts the previous holder back. Exit 1 (nothing moved) when the gate is not met."))
    p.add_argument("name", help="registered model name")
    p.add_argument("--alias", required=True, help="e.g. champion or production")
    p.add_argument("--version", type=int, help="the version to promote (default: newest)")
    p.add_argument("--data", help="labelled rows to compare it with the current holder on")
    p.add_argument("--rollback", action="store_true",
                   help="give the alias back to the version that held it before its last move")
    _gate_options(p)
    args = p.parse_args(argv)
    from export.registry import Registry

    reg = Registry(args.name, args.alias)
    current = reg.holder()
    if args.rollback:
        if args.version is not None or args.data:
            raise InputError("--rollback takes no --version or --data")
        moves = [m for m in reg.history() if m.get("version") == current]
        if not moves or current is None:
            raise InputError(f"{args.name}@{args.alias}: no recorded move to roll back")
        previous = moves[-1].get("previous")
        reg.move(previous, current, "rollback")
        print(f"{args.name}@{args.alias}: version {current} -> "
              f"{'unset' if previous is None else previous} (rollback)")
        return 0
    version = reg.check_version(args.version)
    if version == current:
        print(f"{args.name}@{args.alias} is already version {version}; nothing moved")
        return 0
    result = None
    if args.data and current is not None:
        from export.compare import meets

        names = (f"{args.name} version {current} (@{args.alias})",
                 f"{args.name} version {version}")
        result, _ = _compare(reg.uri(current), reg.uri(version), args.data, args, names)
        if not meets(result.verdict, args.require):
            print(f"--require {args.require}: NOT met; {args.name}@{args.alias} stays at "
                  f"version {current}")
            return EXIT_NOT_MET
    reg.move(version, current, "compared" if result else "set", result)
    print(f"{args.name}@{args.alias}: {'unset' if current is None else f'version {current}'}"
          f" -> version {version}" + (f" ({result.verdict})" if result else ""))
    return 0
