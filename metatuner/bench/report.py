"""The grid's report, rebuilt from ``results.json`` alone: a Markdown table and PNG plots.

Per method and task the table gives the primary metric's mean over seeds and a 95% confidence interval
over test items (each item's score averaged over seeds first, so the interval reflects the finite test
set, which dominates the noise here), then the average over tasks and the relative gain of that
average over BetterTogether, as the paper reports. Below it, MetaTuner-J's paired difference from every
other method per task: the same test items and seeds scored by both, so item difficulty cancels and the
interval is much narrower than the two unpaired ones suggest. Then, where trained runs logged them,
MetaTuner's collapse diagnostics at their last validation (see ``metatuner.training.diagnostics``).
Plots: one bar chart per task (with the intervals), the training curves (loss by step) of the trained
methods and, where runs validated at several steps, the validation score by step.
"""

from __future__ import annotations

import io
import math
from collections import Counter, defaultdict
from pathlib import Path

from metatuner import files
from metatuner.bench.grid import file_name
from metatuner.evaluation.harness import confidence_interval, normal_interval

REFERENCE = "bettertogether"
FOCUS = "metatuner-j"  # the method the paired differences are about
# eval-record key -> (column, format of the mean over seeds); plus "gate", a string, counted
DIAGNOSTICS = {
    "delta_norm": ("ΔW norm", lambda v: f"{v:.3g}"),
    "delta_spread": ("ΔW spread", lambda v: f"{v:.3g}"),
    "prompt_equal_initial": ("prompts = p~ (%)", lambda v: f"{100 * v:.1f}"),
    "prompt_words": ("prompt words", lambda v: f"{v:.1f}"),
    "prompt_cut": ("cut at cap (%)", lambda v: f"{100 * v:.1f}"),
}


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


read_log = files.read_json_lines  # a training log.jsonl: a torn last line is skipped


def _evals(rows: list[dict], root: Path) -> list[tuple[dict, list[dict]]]:
    """(row, its training log's ``phase: eval`` records) for every trained cell that has some."""
    out = []
    for r in rows:
        if r.get("train_log"):
            evals = [x for x in read_log(root / r["train_log"]) if x.get("phase") == "eval"]
            if evals:
                out.append((r, evals))
    return out


def _number(v) -> float | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else None


def diagnostics(rows: list[dict], root: Path) -> dict[tuple[str, str], dict]:
    """(method, task) -> {key: mean over seeds of its value at the run's last validation that logged any
    diagnostic (None where no seed has it), "gate": Counter of gate values, "runs": how many runs}."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r, evals in _evals(rows, root):
        logged = [x for x in evals if "gate" in x or any(k in x for k in DIAGNOSTICS)]
        if logged:
            groups[(r["method"], r["task"])].append(logged[-1])
    out = {}
    for key, lasts in groups.items():
        cell: dict = {"runs": len(lasts), "gate": Counter(str(x["gate"]) for x in lasts if "gate" in x)}
        for k in DIAGNOSTICS:
            values = [v for v in (_number(x.get(k)) for x in lasts) if v is not None]
            cell[k] = sum(values) / len(values) if values else None
        out[key] = cell
    return out


def diagnostics_table(rows: list[dict], root: Path) -> str:
    """The Markdown section of :func:`diagnostics`, or "" when no run logged any."""
    diag = diagnostics(rows, root)
    if not diag:
        return ""
    lines = ["MetaTuner diagnostics (last validation of each run, mean over seeds; '-' where none logged it):", "",
             "| method | task | " + " | ".join(c for c, _ in DIAGNOSTICS.values()) + " | gate |",
             "|---|---|" + "---|" * (len(DIAGNOSTICS) + 1)]
    for (m, t), cell in diag.items():
        values = ["-" if cell[k] is None else fmt(cell[k]) for k, (_, fmt) in DIAGNOSTICS.items()]
        gate = ", ".join(f"{g} x{n}" for g, n in sorted(cell["gate"].items())) or "-"
        lines.append(f"| {m} | {t} | " + " | ".join(values) + f" | {gate} |")
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files.make_dirs(out)
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
        _save(fig, path)
        plt.close(fig)
        written.append(path)
    written += _curves(rows, out, plt)
    written += _val_curves(rows, out, plt)
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
            log = read_log(root / c["train_log"])
            for key in ("task_loss", "sft_loss"):
                pts = [(i, r[key]) for i, r in enumerate(log) if _number(r.get(key)) is not None]
                if pts:
                    ax.plot(*zip(*pts), label=f"{c['method']} {key}")
        ax.set_xlabel("logged step")
        ax.set_ylabel("loss")
        ax.set_title(f"{task}: training curves")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"curves-{file_name(task)}.png"
        _save(fig, path)
        plt.close(fig)
        written.append(path)
    return written


def _val_curves(rows: list[dict], out: Path, plt) -> list[Path]:
    """Validation score by step, mean over seeds, one line per method; one figure per task where some
    method validated at two steps or more."""
    written = []
    evals = _evals(rows, out.parent)
    for task in dict.fromkeys(r["task"] for r in rows):
        curves: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        names = set()
        for r, records in evals:
            if r["task"] != task:
                continue
            run: dict[int, float] = {}  # step -> score; a step validated twice (a resumed run): the last
            for x in records:  # the primary metric's val_ key, else the first numeric val_ key
                keys = sorted((k for k in x if k.startswith("val_") and _number(x[k]) is not None),
                              key=lambda k: k != f"val_{r['primary_metric']}")
                if keys and _number(x.get("step")) is not None:
                    run[int(x["step"])] = _number(x[keys[0]])
                    names.add(keys[0])
            for step, score in run.items():
                curves[r["method"]][step].append(score)
        if not any(len(steps) > 1 for steps in curves.values()):
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for method, steps in curves.items():
            pts = sorted((s, 100 * sum(v) / len(v)) for s, v in steps.items())
            ax.plot(*zip(*pts), marker="o", markersize=3, label=method)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{', '.join(sorted(names))} (%)")
        ax.set_title(f"{task}: validation score, mean over seeds")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"curves-val-{file_name(task)}.png"
        _save(fig, path)
        plt.close(fig)
        written.append(path)
    return written


def _save(fig, path: Path) -> None:
    """A figure as PNG through the crash-safe write path."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    files.write_bytes(path, buf.getvalue())


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
    md = run_dir / "results.md"
    section = diagnostics_table(rows, run_dir)
    files.write_text(md, table(rows) + ("\n\n" + section if section else "") + "\n")
    return md, plot(rows, run_dir / "plots")
