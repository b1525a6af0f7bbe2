"""The grid's report, rebuilt from ``results.json`` alone: a Markdown table and PNG plots.

Per method and task the table gives the primary metric's mean over seeds and a 95% confidence interval
over test items (each item's score averaged over seeds first, so the interval reflects the finite test
set, which dominates the noise here), then the average over tasks and the relative gain of that
average over BetterTogether, as the paper reports. Below it, MetaTuner-J's paired difference from every
other method per task: the same test items and seeds scored by both, so item difficulty cancels and the
interval is much narrower than the two unpaired ones suggest. Plots: one bar chart per task (with the
intervals) and the training curves (loss by step) of the trained methods.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from metatuner.bench.grid import file_name
from metatuner.evaluation.harness import confidence_interval, normal_interval

REFERENCE = "bettertogether"
FOCUS = "metatuner-j"  # the method the paired differences are about


def aggregate(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """(method, task) -> {mean, ci_low, ci_high, seeds, n, metric} over the seeds present."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["task"])].append(r)
    out = {}
    for key, cells in groups.items():
        per_item: dict[str, list[float]] = defaultdict(list)
        for c in cells:
            for item, score in zip(c["item_ids"], c["item_scores"]):
                per_item[item].append(score)
        item_means = [sum(v) / len(v) for v in per_item.values()]
        lo, hi = confidence_interval(item_means)
        out[key] = {
            "mean": sum(c["score"] for c in cells) / len(cells), "ci_low": lo, "ci_high": hi,
            "seeds": sorted(c["seed"] for c in cells), "n": len(item_means), "metric": cells[0]["primary_metric"],
        }
    return out


def table(rows: list[dict]) -> str:
    agg = aggregate(rows)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    lines = [
        "| method | " + " | ".join(f"{t} ({agg[next(k for k in agg if k[1] == t)]['metric']})" for t in tasks)
        + " | average | vs " + REFERENCE + " |",
        "|---|" + "---|" * (len(tasks) + 2),
    ]
    averages = {}
    for m in methods:
        cells = [agg.get((m, t)) for t in tasks]
        if all(cells):
            averages[m] = sum(c["mean"] for c in cells) / len(cells)
    ref = averages.get(REFERENCE)
    for m in methods:
        row = [m]
        for t in tasks:
            c = agg.get((m, t))
            row.append("-" if c is None else f"{100 * c['mean']:.1f} [{100 * c['ci_low']:.1f}, {100 * c['ci_high']:.1f}]")
        avg = averages.get(m)
        row.append("-" if avg is None else f"{100 * avg:.1f}")
        gain = "-" if avg is None or not ref else f"{100 * (avg - ref) / ref:+.1f}%"
        row.append(gain)
        lines.append("| " + " | ".join(row) + " |")
    seeds = sorted({r["seed"] for r in rows})
    ns = sorted({c["n"] for c in agg.values()})
    lines.append("")
    lines.append(f"Scores in %, mean over seeds {seeds}; 95% CI over test items (n = {', '.join(map(str, ns))} per cell).")
    lines += _paired_table(rows, methods, tasks)
    return "\n".join(lines)


def paired_difference(rows: list[dict], method: str, other: str, task: str) -> dict | None:
    """``method`` minus ``other`` on ``task``, paired by test item and seed: each item's difference is
    averaged over the seeds both have, then the mean over items gets a normal 95% interval. None when
    they share no scored item."""
    def scores(m: str) -> dict[tuple[int, str], float]:
        return {(r["seed"], i): s for r in rows if r["method"] == m and r["task"] == task
                for i, s in zip(r["item_ids"], r["item_scores"])}

    a, b = scores(method), scores(other)
    per_item: dict[str, list[float]] = defaultdict(list)
    for key in a.keys() & b.keys():
        per_item[key[1]].append(a[key] - b[key])
    diffs = [sum(v) / len(v) for v in per_item.values()]
    if not diffs:
        return None
    lo, hi = normal_interval(diffs)
    return {"mean": sum(diffs) / len(diffs), "ci_low": lo, "ci_high": hi, "n": len(diffs),
            "better": sum(d > 0 for d in diffs), "worse": sum(d < 0 for d in diffs)}


def _paired_table(rows: list[dict], methods: list[str], tasks: list[str]) -> list[str]:
    if FOCUS not in methods:
        return []
    lines = ["", f"Paired difference, {FOCUS} minus each method (points; 95% CI over test items, paired by item "
             "and seed; * where the interval excludes 0; items better/worse):", "",
             "| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for m in methods:
        if m == FOCUS:
            continue
        row = [m]
        for t in tasks:
            d = paired_difference(rows, FOCUS, m, t)
            if d is None:
                row.append("-")
                continue
            star = "*" if d["ci_low"] > 0 or d["ci_high"] < 0 else ""
            row.append(f"{100 * d['mean']:+.1f} [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}]{star} "
                       f"{d['better']}/{d['worse']}")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def plot(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    agg = aggregate(rows)
    written = []
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for task in dict.fromkeys(r["task"] for r in rows):
        ms = [m for m in methods if (m, task) in agg]
        means = [100 * agg[(m, task)]["mean"] for m in ms]
        err = [[100 * (agg[(m, task)]["mean"] - agg[(m, task)]["ci_low"]) for m in ms],
               [100 * (agg[(m, task)]["ci_high"] - agg[(m, task)]["mean"]) for m in ms]]
        fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(ms) + 1), 3.5))
        ax.bar(range(len(ms)), means, yerr=err, capsize=3, color="#4c72b0")
        ax.set_xticks(range(len(ms)), ms, rotation=35, ha="right")
        ax.set_ylabel(f"{agg[(ms[0], task)]['metric']} (%)")
        ax.set_title(f"{task}: mean over seeds, 95% CI")
        fig.tight_layout()
        path = out / f"bar-{file_name(task)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    written += _curves(rows, out, plt)
    return written


def _curves(rows: list[dict], out: Path, plt) -> list[Path]:
    """Training loss by step for every trained cell (first seed), one figure per task."""
    written = []
    root = out.parent
    for task in dict.fromkeys(r["task"] for r in rows):
        cells = [r for r in rows if r["task"] == task and r.get("train_log") and r["seed"] == min(x["seed"] for x in rows)]
        if not cells:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for c in cells:
            log = [json.loads(line) for line in (root / c["train_log"]).read_text().splitlines()]
            for key in ("task_loss", "sft_loss"):
                pts = [(i, r[key]) for i, r in enumerate(log) if key in r and math.isfinite(r[key])]
                if pts:
                    ax.plot(*zip(*pts), label=f"{c['method']} {key}")
        ax.set_xlabel("logged step")
        ax.set_ylabel("loss")
        ax.set_title(f"{task}: training curves")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"curves-{file_name(task)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def report(run_dir: Path) -> tuple[Path, list[Path]]:
    """Writes ``results.md`` and ``plots/`` from ``run_dir/results.json``."""
    from metatuner.errors import MetatunerError

    path = run_dir / "results.json"
    if not path.is_file():
        raise MetatunerError(f"{path} not found; run `metatuner bench` first")
    rows = json.loads(path.read_text())
    if not rows:
        raise MetatunerError(f"{path} holds no finished cell yet")
    md = run_dir / "results.md"
    md.write_text(table(rows) + "\n")
    return md, plot(rows, run_dir / "plots")
