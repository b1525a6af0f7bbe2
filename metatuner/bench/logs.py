"""What the grid's trained runs logged: their ``log.jsonl`` records and MetaTuner's collapse diagnostics.

A trained cell's row in ``results.json`` names its training log (``train_log``). Every test split of a
cell shares that one log, so each log is read once, under the cell's first row. ``diagnostics`` takes
the values of each run's last validation that logged any (see ``metatuner.training.diagnostics``).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path

from metatuner import files

# eval-record key -> (column, format of the mean over seeds); plus "gate", a string, counted
DIAGNOSTICS = {
    "delta_norm": ("ΔW norm", lambda v: f"{v:.3g}"),
    "delta_spread": ("ΔW spread", lambda v: f"{v:.3g}"),
    "prompt_equal_initial": ("prompts = p~ (%)", lambda v: f"{100 * v:.1f}"),
    "prompt_words": ("prompt words", lambda v: f"{v:.1f}"),
    "prompt_cut": ("cut at cap (%)", lambda v: f"{100 * v:.1f}"),
}


def read_log(path: Path) -> list[dict]:
    """The records of a training ``log.jsonl``, in order; [] when the file is missing. A line that is not
    a JSON object (the torn last line of a run killed mid-write, or still writing) is skipped."""
    return files.read_json_lines(path)


def train_evals(rows: list[dict], root: Path) -> list[tuple[dict, list[dict]]]:
    """(row, its training log's ``phase: eval`` records) for every trained cell that has some; a log
    shared by several rows (one cell's test splits) comes once, with the first of them."""
    out, seen = [], set()
    for r in rows:
        if r.get("train_log") and r["train_log"] not in seen:
            seen.add(r["train_log"])
            evals = [x for x in read_log(root / r["train_log"]) if x.get("phase") == "eval"]
            if evals:
                out.append((r, evals))
    return out


def number(v) -> float | None:
    """``v`` as a float when it is a finite number (not a bool), else None."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else None


def gate_label(record: dict) -> str:
    """What a run's last validation served: ``generated``, ``initial``, or ``retired at step N`` when the
    prompt branch retired itself (``train.prompt_branch=auto``)."""
    if record["gate"] == "retired" and "prompt_branch_step" in record:
        return f"retired at step {record['prompt_branch_step']}"
    return str(record["gate"])


def diagnostics(rows: list[dict], root: Path) -> dict[tuple[str, str], dict]:
    """(method, task) -> {key: mean over seeds of its value at the run's last validation that logged any
    diagnostic (None where no seed has it), "gate": Counter of gate values, "runs": how many runs}."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r, evals in train_evals(rows, root):
        logged = [x for x in evals if "gate" in x or any(k in x for k in DIAGNOSTICS)]
        if logged:
            groups[(r["method"], r["task"])].append(logged[-1])
    out = {}
    for key, lasts in groups.items():
        cell: dict = {"runs": len(lasts), "gate": Counter(gate_label(x) for x in lasts if "gate" in x)}
        for k in DIAGNOSTICS:
            values = [v for v in (number(x.get(k)) for x in lasts) if v is not None]
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
