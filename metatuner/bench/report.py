"""The grid's report, rebuilt from ``results.json`` alone: a Markdown table and PNG plots.

Statistics: one interval method everywhere, the bootstrap over training seeds and test items of
:mod:`metatuner.bench.stats` (2000 resamples, fixed RNG seed), for each method's mean and for
differences, which are paired by item and seed. (A single run's ``summary.json`` keeps the harness's
Wilson/normal interval over items: it has one seed.)

``results.md`` holds, in order:

- the results table: per method and task the primary metric's mean over seeds, its 95% bootstrap
  interval and the spread across seeds (lowest and highest per-seed score), then the average over tasks;
- the relative gain over BetterTogether, as the paper reports it, in a column per task where
  BetterTogether is above zero-shot with a paired interval that excludes zero, and a line saying why
  for every task where it is not (a gain over a reference no better than zero-shot says little);
- MetaTuner-J's paired difference from every other method per task;
- per family, for tasks whose items carry one (``mixture``);
- what each method's fit cost: optimizer steps, trainable parameters, training seconds, tokens generated;
- the learning rates fair tuning chose on validation, with every value's score (:mod:`metatuner.bench.tuning`);
- the learning curves, where the grid scored budgets (``curves.json``, :mod:`metatuner.bench.curves`);
- one line per method that has a diagnostic: DPO's share of pairs with a gold-answer fallback,
  which program step BetterTogether returned and which was best on validation, MetaTuner's share of
  prompts equal to p~ and its ΔW spread between queries; then MetaTuner's full diagnostics table
  (:mod:`metatuner.bench.logs`).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from metatuner import files
from metatuner.bench import stats
from metatuner.bench.curves import curves_table, load_points, plot_curves
from metatuner.bench.logs import diagnostics, diagnostics_table
from metatuner.bench.plots import plot
from metatuner.bench.tuning import tuning_seconds, tuning_table

REFERENCE = "bettertogether"
BASELINE = "zero-shot"
FOCUS = "metatuner-j"  # the method the paired differences are about


def scores(rows: list[dict], method: str, task: str, family: str | None = None) -> stats.Scores:
    """``{(seed, item): score}`` of one method on one task (only the items of ``family`` when given)."""
    out = {}
    for r in rows:
        if r["method"] == method and r["task"] == task:
            families = r.get("item_families") or [None] * len(r["item_ids"])
            out |= {(r["seed"], i): s for i, s, f in zip(r["item_ids"], r["item_scores"], families)
                    if family is None or f == family}
    return out


def aggregate(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """(method, task) -> the bootstrap estimate of :func:`stats.bootstrap_mean` (mean, ci_low, ci_high,
    n, seeds, per_seed), plus the task's ``metric``."""
    out = {}
    for method, task in dict.fromkeys((r["method"], r["task"]) for r in rows):
        metric = next(r["primary_metric"] for r in rows if r["task"] == task)
        out[(method, task)] = stats.bootstrap_mean(scores(rows, method, task)) | {"metric": metric}
    return out


def paired_difference(rows: list[dict], method: str, other: str, task: str) -> dict | None:
    """``method`` minus ``other`` on ``task``, paired by test item and seed, with the bootstrap interval
    over seeds and items (:func:`stats.paired_difference`); None when they share no scored item."""
    return stats.paired_difference(scores(rows, method, task), scores(rows, other, task))


def _pct(est: dict) -> str:
    """``mean [low, high]`` in %, plus ``(min-max)`` over seeds where there are several."""
    text = f"{100 * est['mean']:.1f} [{100 * est['ci_low']:.1f}, {100 * est['ci_high']:.1f}]"
    per_seed = est["per_seed"].values()
    return text + (f" ({100 * min(per_seed):.1f}-{100 * max(per_seed):.1f})" if len(per_seed) > 1 else "")


def _points(d: dict) -> str:
    return f"{100 * d['mean']:+.1f} [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}]"


def gain_tasks(rows: list[dict], tasks: list[str]) -> tuple[list[str], list[str]]:
    """(tasks where BetterTogether is above zero-shot with a paired interval that excludes zero, one line
    per other task saying why the relative gain over it is not shown there)."""
    methods = {r["method"] for r in rows}
    if REFERENCE not in methods:
        return [], [f"Relative gain over {REFERENCE}: not shown, {REFERENCE} is not in this grid."]
    shown, why = [], []
    for t in tasks:
        ref, base = scores(rows, REFERENCE, t), scores(rows, BASELINE, t)
        d = stats.paired_difference(ref, base) if ref and base else None
        if d is not None and d["ci_low"] > 0:
            shown.append(t)
        elif not ref:
            why.append(f"- {t}: {REFERENCE} has no finished cell.")
        elif d is None:
            why.append(f"- {t}: no {BASELINE} cells on the same items to show that {REFERENCE} beats it.")
        else:
            why.append(f"- {t}: {REFERENCE} is not above {BASELINE} with an interval that excludes zero "
                       f"(paired difference {_points(d)} points).")
    if why:
        why.insert(0, f"Relative gain over {REFERENCE} not shown for:")
    return shown, why


def table(rows: list[dict]) -> str:
    """The Markdown tables of ``results.md`` (everything but the sections read from training logs)."""
    agg = aggregate(rows)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    means = {m: {t: agg[(m, t)]["mean"] for t in tasks if (m, t) in agg} for m in methods}
    averages = {m: sum(v.values()) / len(tasks) for m, v in means.items() if len(v) == len(tasks)}
    shown, why = gain_tasks(rows, tasks)
    gain_cols = [(t, {m: v.get(t) for m, v in means.items()}) for t in shown]  # (column, method -> score)
    if len(tasks) > 1 and len(shown) == len(tasks):
        gain_cols.append(("average", averages))
    lines = [
        "| method | " + " | ".join(f"{t} ({next(a['metric'] for k, a in agg.items() if k[1] == t)})" for t in tasks)
        + " | average |" + "".join(f" gain vs {REFERENCE} ({name}) |" for name, _ in gain_cols),
        "|---|" + "---|" * (len(tasks) + 1 + len(gain_cols)),
    ]
    for m in methods:
        row = [m] + ["-" if (m, t) not in agg else _pct(agg[(m, t)]) for t in tasks]
        row.append("-" if m not in averages else f"{100 * averages[m]:.1f}")
        for _, values in gain_cols:
            v, ref = values.get(m), values.get(REFERENCE)
            row.append("-" if v is None or not ref else f"{100 * (v - ref) / ref:+.1f}%")
        lines.append("| " + " | ".join(row) + " |")
    seeds = sorted({r["seed"] for r in rows})
    ns = sorted({a["n"] for a in agg.values()})
    lines += ["", f"Scores in %: mean over seeds {seeds} [95% bootstrap interval over training seeds and test "
              f"items, {stats.RESAMPLES} resamples] (lowest-highest per-seed score); n = {', '.join(map(str, ns))} "
              "test items per cell."]
    if why:
        lines += [""] + why
    return "\n".join(lines + _paired_table(rows, methods, tasks) + _family_tables(rows, methods, tasks))


def _paired_table(rows: list[dict], methods: list[str], tasks: list[str]) -> list[str]:
    if FOCUS not in methods:
        return []
    lines = ["", f"Paired difference, {FOCUS} minus each method (points; 95% bootstrap interval over seeds and "
             "items, paired by item and seed; * where the interval excludes 0; (seed, item) pairs better/worse):",
             "", "| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for m in methods:
        if m == FOCUS:
            continue
        row = [m]
        for t in tasks:
            d = paired_difference(rows, FOCUS, m, t)
            star = "*" if d is not None and stats.excludes_zero(d) else ""
            row.append("-" if d is None else f"{_points(d)}{star} {d['better']}/{d['worse']}")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _family_tables(rows: list[dict], methods: list[str], tasks: list[str]) -> list[str]:
    """Per task whose items carry a family: method x family, mean [95% bootstrap interval] in %."""
    lines = []
    for t in tasks:
        families = list(dict.fromkeys(f for r in rows if r["task"] == t for f in r.get("item_families") or []))
        if not families:
            continue
        lines += ["", f"Per family on {t} (%, mean over seeds [95% bootstrap interval]):", "",
                  "| method | " + " | ".join(families) + " |", "|---|" + "---|" * len(families)]
        for m in methods:
            cells = []
            for f in families:
                s = scores(rows, m, t, f)
                est = stats.bootstrap_mean(s) if s else None
                cells.append("-" if est is None else f"{100 * est['mean']:.1f} [{100 * est['ci_low']:.1f}, "
                             f"{100 * est['ci_high']:.1f}]")
            if any(c != "-" for c in cells):
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def method_lines(rows: list[dict], root: Path) -> list[str]:
    """One line per method that has a diagnostic: DPO's gold-answer fallbacks, the program step
    BetterTogether returned, MetaTuner's share of prompts equal to p~ and ΔW spread between queries."""
    runs: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    seen = set()
    for r in rows:  # one fit per (method, task, seed): a cell's test splits share its predictor
        base = r["task"].split("@")[0]
        if (r["method"], base, r["seed"]) not in seen:
            seen.add((r["method"], base, r["seed"]))
            runs[r["method"]][base].append(r.get("predictor") or {})
    diag = diagnostics(rows, root)
    lines = []
    for m, per_task in runs.items():
        parts = []
        for t, preds in per_task.items():
            dpo = [p["training"] for p in preds if "gold_fallback" in (p.get("training") or {})]
            steps = [_chosen(p) for p in preds if "chosen_step" in p]
            best = [_chosen(p, "best") for p in preds if "best_step" in p]
            if dpo:
                gold, pairs = sum(x["gold_fallback"] for x in dpo), sum(x["pairs"] for x in dpo)
                parts.append(f"gold-answer fallback in {gold}/{pairs} pairs ({100 * gold / max(pairs, 1):.1f}%) on {t}")
            if steps:
                counted = ", ".join(f"{s} x{n}" for s, n in sorted(Counter(steps).items()))
                parts.append(f"returned {counted} on {t}")
            if best:  # BetterTogether returns its final program by default; the best on validation is recorded
                counted = ", ".join(f"{s} x{n}" for s, n in sorted(Counter(best).items()))
                parts.append(f"best on validation {counted} on {t}")
        for (dm, t), cell in diag.items():
            if dm == m and (cell["prompt_equal_initial"] is not None or cell["delta_spread"] is not None):
                equal, spread = cell["prompt_equal_initial"], cell["delta_spread"]
                parts.append(f"prompts = p~ {'-' if equal is None else f'{100 * equal:.1f}%'}, ΔW spread "
                             f"{'-' if spread is None else f'{spread:.3g}'} on {t} ({cell['runs']} runs)")
        if parts:
            lines.append(f"- {m}: " + "; ".join(parts))
    return ["Method diagnostics (one line per method that has one):", ""] + lines if lines else []


def cost_table(rows: list[dict], tuning: dict[str, float] | None = None) -> str:
    """Per method, what its fit cost (mean over its cells, each counted once whatever splits it scored): the
    optimizer steps, the parameters trained, the seconds of fitting and the tokens decoded while fitting;
    with ``tuning`` (method -> seconds of its tuning runs per task), those seconds too."""
    tuning = tuning or {}
    one: dict[tuple, dict] = {}  # (method, task, seed) -> the row of its `test` split, else of its first split
    for r in rows:  # one fit per cell; its splits share it
        key = (r["method"], r["task"].split("@")[0], r["seed"])
        if key not in one or (r.get("split", "test") == "test" and one[key].get("split", "test") != "test"):
            one[key] = r
    cells: dict[str, list[dict]] = defaultdict(list)
    for (method, _, _), r in one.items():
        cells[method].append(r)

    def mean(values: list, fmt: str) -> str:
        values = [v for v in values if v is not None]
        return "-" if not values else format(sum(values) / len(values), fmt)

    lines = ["Cost of fitting (mean per cell; steps include warm-ups; tokens are those decoded while fitting: "
             "rollouts, sampled answers, proposals, validation):", "",
             "| method | optimizer steps | trainable parameters | training seconds | tokens generated |"
             + (" tuning seconds (per task) |" if tuning else ""), "|---|---|---|---|---|" + ("---|" if tuning else "")]
    for m, rs in cells.items():
        lines.append(f"| {m} | {mean([r.get('budget') for r in rs], '.0f')} | "
                     f"{mean([r.get('trainable_params') for r in rs], ',.0f')} | "
                     f"{mean([r.get('fit_seconds') for r in rs], '.0f')} | {mean([r.get('train_tokens') for r in rs], ',.0f')} |"
                     + (f" {tuning[m]:.0f} |" if m in tuning else " - |" if tuning else ""))
    return "\n".join(lines)


def _chosen(predictor: dict, which: str = "chosen") -> str:
    """BetterTogether's returned (``chosen``) or best-on-validation (``best``) program as ``step N (kind)``:
    kind is initial, p or w."""
    step = predictor[f"{which}_step"]
    kind = predictor.get(f"{which}_kind") or next(
        (s.get("kind") for s in predictor.get("steps", []) if s.get("step") == step), "?")
    return f"step {step} ({kind})"


def report(run_dir: Path) -> tuple[Path, list[Path]]:
    """Writes ``results.md`` and ``plots/`` from ``run_dir/results.json``."""
    from metatuner.errors import MetatunerError

    path = run_dir / "results.json"
    if not path.is_file():
        raise MetatunerError(f"{path} not found; run `metatuner bench` first")
    rows = files.read_json(path)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise MetatunerError(f"{path} does not hold a grid's results (a list of cells)")
    if not rows:
        raise MetatunerError(f"{path} holds no finished cell yet")
    points = load_points(run_dir)
    sections = [table(rows), cost_table(rows, tuning_seconds(run_dir)), tuning_table(run_dir), curves_table(points), "\n".join(method_lines(rows, run_dir)),
                diagnostics_table(rows, run_dir)]
    md = run_dir / "results.md"
    files.write_text(md, "\n\n".join(s for s in sections if s) + "\n")
    return md, plot(rows, run_dir / "plots", aggregate(rows)) + plot_curves(points, run_dir / "plots")
