"""The model card as text, for `trainer inspect`, the export's last lines and MLflow."""

from __future__ import annotations

from export.card import Card


def format_card(card: Card) -> str:
    """A readable summary of the whole card."""
    spec, data = card.input, card.dataset
    lines = [f"task:        {card.task}"]
    if not card.regression:
        lines.append(f"classes:     {len(card.class_names)}: {', '.join(card.class_names)}")
    lo, hi = spec.value_range
    splits = data.split_sizes
    lines.append(f"input:       {spec.name} {spec.dtype} {spec.layout or ''} "
                 f"shape [N, {', '.join(map(str, spec.shape))}] values in [{lo:g}, {hi:g}]")
    if spec.columns:
        lines.append(f"features:    {', '.join(spec.columns)}")
    lines += [
        f"outputs:     {', '.join(card.outputs)}",
        f"precision:   {card.precision}",
        f"dataset:     {data.name} fingerprint {data.fingerprint[:16]}... splits "
        + (", ".join(f"{k} {v:,}" for k, v in splits.items()) if splits else "unknown"),
    ]
    if data.copies and (copies := data.copies.line()):
        lines.append(f"copies:      {copies}")
    if missing := data.unmeasured(card.class_names):
        lines.append(f"unmeasured:  {missing} (classes without a validation row)")
    if card.metrics:
        lines.append("metrics:     " + ", ".join(
            f"{k}={int(v)}" if float(v).is_integer() and "samples" in k else f"{k}={v:.4f}"
            for k, v in card.metrics.items()))
    lines += gate_lines(card)
    if card.drift_reference:
        from export.drift import small_reference

        lines.append(f"drift ref:   {card.drift_reference.rows} validation rows"
                     + (f": {note}" if (note := small_reference(card)) else ""))
    if t := card.training:
        epochs = (f"{t.run_epochs} epochs, exported weights from epoch {t.weights_epoch}"
                  if t.run_epochs is not None else f"{t.epochs} epochs")
        net = t.model.network
        lines.append(f"training:    {net}, {epochs}, seed {t.seed}, "
                     f"checkpoint sha256 {(t.checkpoint_sha256 or '')[:16]}...")
        if init := t.model.init_from:
            lines.append(f"lineage:     started from {init}" + (
                f" (sha256 {t.parent_sha256[:16]}...)" if t.parent_sha256 else ""))
        if t.dataset_change:
            lines.append(f"data change: {t.dataset_change.line()}")
    if card.versions:
        lines.append("versions:    " + ", ".join(f"{k} {v}" for k, v in card.versions.items()))
    if card.created:
        lines.append(f"created:     {card.created}")
    return "\n".join(lines)


def gate_lines(card: Card) -> list[str]:
    """What the export checked: the graph against its own recorded metric, then against
    torch output by output (fp32/fp16) or by accuracy (INT8)."""
    lines = []
    if (c := card.consistency) and c.checked:
        lines.append(f"consistent:  graph {c.metric}={c.graph:.4f}, recorded {c.recorded:.4f} "
                     f"on {c.rows} validation rows")
    if (b := card.baseline) and b.checked:
        lines.append(f"baseline:    graph {b.metric}={b.model:.4f}, always answering "
                     f"{b.constant_answer} {b.constant:.4f}"
                     + ("" if b.better else " (NO BETTER: exported with --allow-trivial)"))
    q, p = card.quantization, card.parity
    if q:
        lines.append(f"int8 gate:   validation accuracy {q.val_accuracy_int8:.4f} vs fp32 "
                     f"{q.val_accuracy_fp32:.4f} ({q.drop_points:+.2f} points, max "
                     f"{q.max_drop_points:g}) on {q.val_samples} rows")
        if p:
            lines.append(f"agreement:   top-1 {p.top1_agreement:.4f} with torch fp32 on "
                         f"{p.samples} samples")
    elif p:
        lines.append(f"parity:      max |onnx - torch| = {p.max_abs_diff:.2e} on {p.samples} "
                     f"samples, top-1 agreement {p.top1_agreement:.4f}")
    if card.calibration is not None:
        lines.append(f"calibration: {calibration_line(card.calibration)}")
    return lines


def calibration_line(c) -> str:
    """`T=1.43, test ECE 0.031 -> 0.008; conformal: lac on 500 rows`."""
    where, before, after = ("test", c.test_before, c.test_after) if c.test_before else \
        ("fit", c.fit_before, c.fit_after)
    head = (f"T={c.temperature:.3g}, {where} ECE {before.ece:.3f} -> {after.ece:.3f}"
            if c.temperature and before and after else (c.note or "no temperature"))
    return f"{head}; conformal: {c.method} on {len(c.scores)} rows"
