"""The grid's figures: per task a bar chart of each method's mean with its interval, the training
curves (loss by step) of the trained methods, and, where runs validated at several steps, the
validation score by step."""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path

from metatuner import files
from metatuner.bench.cells import file_name
from metatuner.bench.logs import number, read_log, train_evals


def save_png(fig, path: Path) -> None:
    """A figure as PNG through the crash-safe write path."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    files.write_bytes(path, buf.getvalue())


def finish(fig, ax, xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    """Labels, a legend, and the figure saved as ``path`` (then closed)."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return path


def plot(rows: list[dict], out: Path, agg: dict[tuple[str, str], dict]) -> list[Path]:
    """Writes the figures into ``out``; ``agg`` is the report's (method, task) -> mean and interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files.make_dirs(out)
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
        ax.set_title(f"{task}: mean over seeds, 95% bootstrap interval")
        fig.tight_layout()
        path = out / f"bar-{file_name(task)}.png"
        save_png(fig, path)
        plt.close(fig)
        written.append(path)
    written += _curves(rows, out, plt)
    written += _val_curves(rows, out, plt)
    return written


def _curves(rows: list[dict], out: Path, plt) -> list[Path]:
    """Training loss by step for every trained cell (first seed), one figure per task; a cell's other test
    splits share its log and get no figure of their own."""
    written = []
    root = out.parent
    first_seed = min(x["seed"] for x in rows)
    logs: dict[str, str] = {}  # train log -> the task of its first row
    for r in rows:
        if r.get("train_log") and r["seed"] == first_seed:
            logs.setdefault(r["train_log"], r["task"])
    for task in dict.fromkeys(logs.values()):
        cells = [r for r in rows if r["task"] == task and logs.get(r.get("train_log")) == task and r["seed"] == first_seed]
        if not cells:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for c in cells:
            log = read_log(root / c["train_log"])
            for key in ("task_loss", "sft_loss"):
                pts = [(i, r[key]) for i, r in enumerate(log) if number(r.get(key)) is not None]
                if pts:
                    ax.plot(*zip(*pts), label=f"{c['method']} {key}")
        written.append(finish(fig, ax, "logged step", "loss", f"{task}: training curves",
                              out / f"curves-{file_name(task)}.png"))
    return written


def _val_curves(rows: list[dict], out: Path, plt) -> list[Path]:
    """Validation score by step, mean over seeds, one line per method; one figure per task where some
    method validated at two steps or more."""
    written = []
    evals = train_evals(rows, out.parent)
    for task in dict.fromkeys(r["task"] for r in rows):
        curves: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        names = set()
        for r, records in evals:
            if r["task"] != task:
                continue
            run: dict[int, float] = {}  # step -> score; a step validated twice (a resumed run): the last
            for x in records:  # the primary metric's val_ key, else the first numeric val_ key
                keys = sorted((k for k in x if k.startswith("val_") and number(x[k]) is not None),
                              key=lambda k: k != f"val_{r['primary_metric']}")
                if keys and number(x.get("step")) is not None:
                    run[int(x["step"])] = number(x[keys[0]])
                    names.add(keys[0])
            for step, score in run.items():
                curves[r["method"]][step].append(score)
        if not any(len(steps) > 1 for steps in curves.values()):
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for method, steps in curves.items():
            pts = sorted((s, 100 * sum(v) / len(v)) for s, v in steps.items())
            ax.plot(*zip(*pts), marker="o", markersize=3, label=method)
        written.append(finish(fig, ax, "step", f"{', '.join(sorted(names))} (%)",
                              f"{task}: validation score, mean over seeds", out / f"curves-val-{file_name(task)}.png"))
    return written
