"""Champion against challenger on the same labelled rows, with a paired test: may the
retrained model replace the deployed one? Torch-free (numpy, scipy, onnxruntime).

Both graphs predict every row through the deployed path (`Predictor`, the same readers
and decoder as `trainer predict`). Classification pairs each row's two answers: b rows
only the champion gets right, c rows only the challenger. The exact McNemar test is the
binomial test of c among the b + c discordant rows (p = 1/2 under equal accuracy), and the
interval of the accuracy difference d = (c - b) / n is the exact (Clopper-Pearson)
interval of that binomial proportion, mapped to d: the two always agree, and a model
against itself (b = c = 0) has d = 0 exactly. Regression compares the per-row absolute
errors: the interval of the MAE difference is a seeded paired bootstrap (percentile;
the normal interval of the mean difference above BOOTSTRAP_ROWS rows, where the two agree).

Verdict, with the non-inferiority margin m >= 0 in the metric's units, and one-sided
intervals at level 1 - alpha on the improvement (accuracy gained, or MAE lost):
`better` when the lower bound is > 0; `not worse` when it is >= -m; `worse` when the upper
bound is < -m; `inconclusive` otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats

from export.card import Card
from export.errors import InputError
from export.readers import iter_chunks
from export.records import Record, entry, is_bool, is_num, is_str, list_of, one_of

BOOTSTRAP_ROWS = 20_000  # above, the normal interval (the two agree to 1e-3 at this size)
BOOTSTRAP_RESAMPLES = 2000
VERDICTS = ("better", "not worse", "worse", "inconclusive")


@dataclass(frozen=True, kw_only=True)
class Comparison(Record):
    """What `trainer compare` measured and decided."""

    task: str = entry(one_of("classification", "regression"), "classification or regression")
    metric: str = entry(is_str, "accuracy or mae")
    rows: int = entry(is_num, "a number")
    champion: float = entry(is_num, "a number")
    challenger: float = entry(is_num, "a number")
    champion_interval: tuple[float, float] = entry(list_of(is_num, 2), "[low, high]")
    challenger_interval: tuple[float, float] = entry(list_of(is_num, 2), "[low, high]")
    improvement: float = entry(is_num, "a number")  # accuracy gained, or MAE lost
    improvement_interval: tuple[float, float] = entry(list_of(is_num, 2),
                                                      "[low, high] (one-sided bounds)")
    p_value: float = entry(is_num, "a number")  # one-sided: the challenger is not better
    test: str = entry(is_str, "the test's name")
    alpha: float = entry(is_num, "a number")
    margin: float = entry(is_num, "a number")
    verdict: str = entry(one_of(*VERDICTS), "better, not worse, worse or inconclusive")
    champion_only: int | None = entry(is_num, "a number", None)  # discordant rows
    challenger_only: int | None = entry(is_num, "a number", None)
    # the two files load the same bytes: any difference measured is none
    same_model: bool = entry(is_bool, "true or false", False)


def check_same_problem(champion: Card, challenger: Card, names: tuple[str, str]) -> None:
    """Two models answer the same question only if their cards agree on the task, the
    classes (names and order) and the input spec; otherwise one line naming the field."""
    a, b = champion, challenger
    fields = [("task", a.task, b.task), ("class_names", list(a.class_names),
                                         list(b.class_names))]
    fields += [(f"input.{k}", v, b.input.to_json().get(k)) for k, v in a.input.to_json().items()
               if k != "preprocessing"]
    for name, left, right in fields:
        if left != right:
            raise InputError(f"{names[1]}: model card field {name!r} is {right!r} but the "
                             f"champion's ({names[0]}) is {left!r}; they answer different "
                             f"questions")


def score_rows(champion, challenger, data: str, chunk_rows: int = 8192):
    """Per-row outcomes of both models on every labelled row of `data`: (right_a, right_b)
    booleans for a classifier, (abs_err_a, abs_err_b) for a regressor."""
    card, a_out, b_out = champion.card, [], []
    for i, chunk in enumerate(iter_chunks(data, champion.spec, champion.class_names,
                                          chunk_rows, "fail", card.dataset.target, flag="--data")):
        if chunk.y is None:
            raise InputError(f"{data}: the rows have no labels ({_where_labels(card)}); "
                             f"a comparison needs them")
        for predictor, out in ((champion, a_out), (challenger, b_out)):
            pred = predictor.predict(chunk.x, 256, source=f"{data} (chunk {i})")
            out.append(np.abs(pred.values.astype(np.float64) - chunk.y)
                       if card.regression else pred.labels == chunk.y)
    if not a_out or not sum(len(a) for a in a_out):
        raise InputError(f"{data}: no rows to compare on")
    return np.concatenate(a_out), np.concatenate(b_out)


def _where_labels(card: Card) -> str:
    if card.input.image:
        return "images in folders named after their class, or an .npz with 'y'"
    return f"a column {card.dataset.target!r}" if card.dataset.target else "an .npz with 'y'"


def _wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    ci = stats.binomtest(k, n).proportion_ci(level, method="wilson")
    return float(ci.low), float(ci.high)


def compare_classifiers(right_a, right_b, alpha: float, margin: float) -> Comparison:
    n = len(right_a)
    b = int((right_a & ~right_b).sum())  # only the champion right
    c = int((~right_a & right_b).sum())  # only the challenger right
    d = (c - b) / n
    if b + c:
        # one-sided bounds at 1 - alpha each: the two-sided interval at 1 - 2 alpha
        ci = stats.binomtest(c, b + c).proportion_ci(1 - 2 * alpha, method="exact")
        low, high = ((b + c) / n * (2 * ci.low - 1), (b + c) / n * (2 * ci.high - 1))
        p = float(stats.binomtest(c, b + c, 0.5, alternative="greater").pvalue)
    else:
        low = high = 0.0
        p = 1.0
    acc_a, acc_b = float(right_a.mean()), float(right_b.mean())
    return Comparison(task="classification", metric="accuracy", rows=n, champion=acc_a,
                      challenger=acc_b, champion_interval=_wilson(int(right_a.sum()), n),
                      challenger_interval=_wilson(int(right_b.sum()), n), improvement=d,
                      improvement_interval=(low, high), p_value=p,
                      test="exact McNemar (one-sided)", alpha=alpha, margin=margin,
                      verdict=_verdict(low, high, margin), champion_only=b, challenger_only=c)


def _mean_interval(err: np.ndarray, rng, level: float) -> tuple[float, float]:
    """Percentile bootstrap of the mean (seeded), or the normal interval for many rows."""
    n = len(err)
    if n > BOOTSTRAP_ROWS:
        half = stats.norm.ppf(0.5 + level / 2) * err.std(ddof=1) / math.sqrt(n)
        return float(err.mean() - half), float(err.mean() + half)
    means = np.array([err[rng.integers(0, n, n)].mean() for _ in range(BOOTSTRAP_RESAMPLES)])
    return (float(np.quantile(means, 0.5 - level / 2)),
            float(np.quantile(means, 0.5 + level / 2)))


def compare_regressors(err_a, err_b, alpha: float, margin: float, seed: int = 0) -> Comparison:
    rng = np.random.default_rng(seed)
    gain = err_a - err_b  # per row: how much less the challenger is off
    low, high = _mean_interval(gain, rng, 1 - 2 * alpha)
    p = float(stats.wilcoxon(gain, alternative="greater").pvalue) if np.any(gain) else 1.0
    return Comparison(task="regression", metric="mae", rows=len(gain),
                      champion=float(err_a.mean()), challenger=float(err_b.mean()),
                      champion_interval=_mean_interval(err_a, rng, 0.95),
                      challenger_interval=_mean_interval(err_b, rng, 0.95),
                      improvement=float(gain.mean()), improvement_interval=(low, high),
                      p_value=p, test=f"paired bootstrap of the MAE difference ({seed=}); "
                      f"Wilcoxon signed-rank p", alpha=alpha, margin=margin,
                      verdict=_verdict(low, high, margin))


def _verdict(low: float, high: float, margin: float) -> str:
    if low > 0:
        return "better"
    if low >= -margin:
        return "not worse"
    if high < -margin:
        return "worse"
    return "inconclusive"


def meets(verdict: str, require: str) -> bool:
    return verdict == "better" if require == "better" else verdict in ("better", "not worse")


def format_comparison(c: Comparison, names: tuple[str, str]) -> str:
    unit = "points" if c.metric == "accuracy" else "MAE"
    scale = 100 if c.metric == "accuracy" else 1
    fmt = "{:.4f}"
    lines = [f"{'':12}{c.metric:>10}  95% interval", *(
        f"{role:12}{fmt.format(v):>10}  [{fmt.format(lo)}, {fmt.format(hi)}]  {name}"
        for role, v, (lo, hi), name in (("champion", c.champion, c.champion_interval, names[0]),
                                        ("challenger", c.challenger, c.challenger_interval,
                                         names[1])))]
    lo, hi = c.improvement_interval
    gained = "accuracy gained" if c.metric == "accuracy" else "MAE lost"
    lines.append(f"improvement ({gained}) {c.improvement * scale:+.3f} {unit}, one-sided "
                 f"{100 * (1 - c.alpha):g}% bounds [{lo * scale:+.3f}, {hi * scale:+.3f}] on "
                 f"{c.rows:,} rows; margin {c.margin * scale:g} {unit}")
    if c.champion_only is not None:
        lines.append(f"discordant rows: {c.champion_only} only the champion got right, "
                     f"{c.challenger_only} only the challenger; {c.test} p = {c.p_value:.3g}")
    else:
        lines.append(f"{c.test} = {c.p_value:.3g}")
    if c.same_model:
        lines.append("note: the champion and the challenger are the same model (equal SHA-256)")
    lines.append(f"verdict: {c.verdict}")
    return "\n".join(lines)


def lineage_line(card: Card) -> str:
    """Where a model came from: its dataset, its run, the model it was started from."""
    t, data = card.training, card.dataset
    parent = (t.model.init_from if t else None) or "none"
    if t and t.parent_sha256:
        parent += f" (sha256 {t.parent_sha256[:12]})"
    epochs = f"{t.run_epochs} epochs" if t and t.run_epochs is not None else "epochs unknown"
    change = f"; data: {t.dataset_change.line()}" if t and t.dataset_change else ""
    copies = f"; copies: {line}" if data.copies and (line := data.copies.line()) else ""
    unmeasured = f"; unmeasured: {missing}" if (missing := data.unmeasured(card.class_names)) \
        else ""
    return (f"dataset {data.name} {data.fingerprint[:12]} ({_splits(data.split_sizes)}), "
            f"{epochs}, seed {t.seed if t else None}, started from {parent}, "
            f"created {card.created}{change}{copies}{unmeasured}")


def _splits(sizes: dict | None) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sizes.items()) if sizes else "splits unknown"


def run_compare(champion: str, challenger: str, data: str, *, alpha: float = 0.05,
                margin: float = 0.0, provider: str = "auto", names=None) -> Comparison:
    """Score both local ONNX files on `data` and compare them (see the module's text)."""
    from export.runtime import Predictor

    if not 0 < alpha < 0.5:
        raise InputError(f"--alpha {alpha}: expected a number between 0 and 0.5")
    if not (math.isfinite(margin) and margin >= 0):
        raise InputError(f"--margin {margin}: expected a number >= 0 in the metric's units "
                         f"(accuracy as a fraction: 0.01 is one point)")
    names = names or (champion, challenger)
    a, b = Predictor(champion, provider=provider), Predictor(challenger, provider=provider)
    check_same_problem(a.card, b.card, names)
    if not a.card.regression and margin >= 1:  # "--margin 5" meant as points
        raise InputError(f"--margin {margin:g}: accuracy is a fraction here (0.01 is one "
                         "point); a margin of 1 or more would pass any challenger")
    out_a, out_b = score_rows(a, b, data)
    compare = compare_regressors if a.card.regression else compare_classifiers
    return replace(compare(out_a, out_b, alpha, margin), same_model=a.sha256 == b.sha256)
