"""Learning curves: each method's score at several training budgets, from the grid's ``curves.json``.

A protocol with ``common.eval.budgets`` trains each (method, seed) once and scores it at those optimizer
steps (warm-ups counted) and at its end (``metatuner/recipes.py`` ``eval_method``); :func:`collect.collect`
gathers the points into ``curves.json``. Per task, every point gets the bootstrap mean and interval
over seeds and items (:mod:`metatuner.bench.stats`). Methods that do not train (zero-shot) have one
point at step 0, drawn as a flat line across the budgets.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from metatuner.bench import stats
from metatuner import files
from metatuner.bench.cells import file_name
from metatuner.bench.plots import finish


def curve_points(points: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """task -> method -> points sorted by budget: ``{budget, seconds, mean, ci_low, ci_high}`` where
    ``seconds`` is the mean over seeds of the fit seconds spent until that budget."""
    groups: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
    for r in points:
        groups[(r["task"], r["method"], r["budget"])].append(r)
    out: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for (task, method, budget), cells in sorted(groups.items(), key=lambda kv: kv[0]):
        est = stats.bootstrap_mean({(c["seed"], i): s for c in cells for i, s in zip(c["item_ids"], c["item_scores"])})
        secs = [c["fit_seconds"] for c in cells if c.get("fit_seconds") is not None]
        out[task][method].append({"budget": budget, "seconds": sum(secs) / len(secs) if secs else None,
                                  "mean": est["mean"], "ci_low": est["ci_low"], "ci_high": est["ci_high"]})
    return out


def curves_table(points: list[dict]) -> str:
    """Markdown: per task, each method's mean [interval] at every budget."""
    lines = []
    for task, methods in curve_points(points).items():
        budgets = sorted({p["budget"] for ps in methods.values() for p in ps})
        lines += [f"Learning curve, {task} (optimizer steps, warm-ups counted; % with 95% bootstrap interval "
                  "over seeds and items):", "", "| method | " + " | ".join(map(str, budgets)) + " |",
                  "|---|" + "---|" * len(budgets)]
        for method, ps in methods.items():
            at = {p["budget"]: p for p in ps}
            cells = [f"{100 * at[b]['mean']:.1f} [{100 * at[b]['ci_low']:.1f}, {100 * at[b]['ci_high']:.1f}]"
                     if b in at else "" for b in budgets]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).strip()


def plot_curves(points: list[dict], out: Path) -> list[Path]:
    """Per task two figures: score against optimizer steps, and against fit seconds, one line per method
    with its band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files.make_dirs(out)
    written = []
    for task, methods in curve_points(points).items():
        top = max(p["budget"] for ps in methods.values() for p in ps)
        for axis, label in (("budget", "optimizer steps (warm-ups counted)"), ("seconds", "fit seconds")):
            fig, ax = plt.subplots(figsize=(5.5, 3.8))
            for method, ps in methods.items():
                ps = [p for p in ps if p[axis] is not None]
                if not ps:
                    continue
                if len(ps) == 1 and axis == "budget":  # a method without training: flat across the budgets
                    ps = [ps[0] | {"budget": 0}, ps[0] | {"budget": top}]
                xs = [p[axis] for p in ps]
                ax.plot(xs, [100 * p["mean"] for p in ps], marker="o", markersize=3, label=method)
                ax.fill_between(xs, [100 * p["ci_low"] for p in ps], [100 * p["ci_high"] for p in ps], alpha=0.15)
            written.append(finish(fig, ax, label, "score (%)", f"{task}: learning curve, 95% bootstrap band",
                                  out / f"learning-{axis}-{file_name(task)}.png"))
    return written


def load_points(run_dir: Path) -> list[dict]:
    path = run_dir / "curves.json"
    return json.loads(path.read_text()) if path.is_file() else []
