"""Collection: ``results.json`` (and ``curves.json``) rebuilt from every finished cell of a grid folder.

Every backend calls :func:`collect` after each cell and at the end; it reads only the files in the folder, so
the rows are the same whichever processes, on whichever machines, wrote the cells. Several test splits
(``eval.splits``, e.g. ``[test, test_shift]``) are a row each, under the task name ``<task>@<split>`` (the
first split ``test`` keeps the plain task name), so the report shows ``arithmetic`` and
``arithmetic@test_shift`` as columns side by side, each paired by item and seed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from metatuner import files
from metatuner.bench.tuning import chosen


def task_label(task: str, split: str) -> str:
    """A results row's task: the task name for its ``test`` split, ``<task>@<split>`` for another."""
    return task if split == "test" else f"{task}@{split}"


_BUDGET = re.compile(r"^(.*)\.b(\d+)$")


def collect(out: Path) -> list[dict]:
    """Rebuilds ``results.json`` from every finished results folder of a cell, one row per split (atomically).

    Learning-curve points (``<cell>.b<step>`` folders, ``eval.budgets``) go to ``curves.json`` instead,
    together with each cell's final point; every row carries what its predictor cost (``budget.json``):
    ``budget`` (optimizer steps), ``fit_seconds``, ``train_tokens`` (decoded while fitting) and
    ``trainable_params`` (None for cells run before these were recorded).
    """
    rows, points = [], []
    for summary_path in sorted((out / "cells").glob("*/summary.json")):
        if summary_path.parent.name.startswith("."):  # a cell folder still being written by another worker
            continue
        s = json.loads(summary_path.read_text())
        cell = summary_path.parent.name.split("@")[0]  # a split's folder belongs to the cell it is named after
        point = _BUDGET.match(cell)
        cell = point.group(1) if point else cell
        task_file, method, seed = cell.split("--")
        records = _records(summary_path.parent)
        per_item = [r["scores"][s["primary_metric"]] for r in records]
        train_log = summary_path.parent.with_name(cell + "-train") / "log.jsonl"
        families = {"item_families": [r["family"] for r in records]} if all("family" in r for r in records) else {}
        rows.append({
            "task": task_label(s["task"], s.get("split", "test")), "split": s.get("split", "test"),
            "method": method, "seed": int(seed.removeprefix("seed")), "n": s["n"],
            "primary_metric": s["primary_metric"], "score": s["metrics"][s["primary_metric"]]["mean"],
            "ci_low": s["metrics"][s["primary_metric"]]["ci_low"], "ci_high": s["metrics"][s["primary_metric"]]["ci_high"],
            "metrics": s["metrics"], "eval_seconds": s["timing"]["seconds"],
            "fit_seconds": _budget(summary_path.parent).get("fit_seconds", _cell(summary_path.parent.with_name(cell)).get("fit_seconds")),
            "budget": _budget(summary_path.parent).get("steps"), "new_tokens": s["timing"]["new_tokens"],
            "train_tokens": _budget(summary_path.parent).get("train_tokens"),
            "trainable_params": _budget(summary_path.parent).get("trainable_params"),
            "item_ids": [r["id"] for r in records], "item_scores": per_item, **families,
            "train_log": str(train_log.relative_to(out)) if train_log.is_file() else None,
            "predictor": s.get("predictor", {}), "environment": s.get("environment", {}),
            "tuned": chosen(out, task_file, method),
        })
        if point:
            points.append(rows.pop())
    saved = out / "protocol.yaml"
    if saved.is_file():  # the table follows the protocol's order of tasks and methods, a task's test split first
        spec = yaml.safe_load(saved.read_text())
        task_rank = {t: i for i, t in enumerate(spec["tasks"])}
        method_rank = {m: i for i, m in enumerate(spec["methods"])}
        order = lambda r: (method_rank.get(r["method"], 99), task_rank.get(r["task"].split("@")[0], 99),  # noqa: E731
                           r["split"] != "test", r["split"], r["seed"], r["budget"] or 0)
        rows.sort(key=order)
        points.sort(key=order)
    files.write_json(out / "results.json", rows, indent=1)
    if points:
        curves = sorted(points + [r for r in rows if r["budget"] is not None], key=lambda r: (r["method"], r["task"], r["seed"], r["budget"]))
        files.write_json(out / "curves.json", curves, indent=1)
    return rows


def _budget(folder: Path) -> dict[str, Any]:
    """A results folder's ``budget.json`` (optimizer steps and fit seconds behind it), when written.

    A split's folder (``<folder>@<split>``) shares the budget of the folder it is named after."""
    path = folder.with_name(folder.name.split("@")[0]) / "budget.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]


def _cell(folder: Path) -> dict[str, Any]:
    path = folder / "cell.json"
    return json.loads(path.read_text()) if path.is_file() else {}
