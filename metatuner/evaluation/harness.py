"""The evaluation harness: the single code path every method is scored by.

``evaluate(predictor, task, examples, ...)`` runs the predictor over the examples in batches (sorted
by input length so padding stays small; results are returned in the original order), extracts and
scores every answer with the task's own functions, and writes a results folder:

- ``records.jsonl``: one line per example: id, instruction, rendered input, output, extracted
  answers, gold answer, scores (and option log-probabilities for multiple-choice tasks);
- ``summary.json``: the split scored, per metric the mean and a 95% confidence interval, plus the
  config, package versions, git commit and timing. Where examples carry a family
  (``Example.meta["family"]``, the ``mixture`` task), every metric is also reported per family, as
  ``<metric>/family=<family>`` with its item count ``n``.

Intervals: a single run's ``summary.json`` has one seed, so its interval is over test items only:
Wilson's score interval for 0/1 scores, the normal one otherwise (:func:`confidence_interval`). The
grid's report, which has several training seeds, uses one bootstrap over seeds and items instead
(:mod:`metatuner.bench.stats`).

The folder is written under a temporary name and renamed when complete (:mod:`metatuner.files`), so an
interrupted run leaves no half-written results behind. A SIGTERM or SIGINT stops an evaluation between
two batches (:mod:`metatuner.interrupts`), with nothing written.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import subprocess
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from metatuner import files, interrupts
from metatuner.errors import MetatunerError, folder_taken
from metatuner.evaluation.predictors import Predictor
from metatuner.tasks.base import Example, Task

PACKAGES = ("metatuner", "torch", "transformers", "peft", "accelerate", "trl", "math-verify")


@dataclass
class EvalResult:
    task: str
    n: int
    metrics: dict[str, dict[str, float]]
    primary_metric: str
    seconds: float
    records: list[dict[str, Any]] = field(repr=False)
    out_dir: Path | None = None
    split: str = "test"

    @classmethod
    def load(cls, folder: Path) -> "EvalResult":
        """The result a complete results folder holds (a split scored by an earlier attempt of a resumed fit)."""
        summary, records = read_results_folder(folder)
        return cls(summary["task"], summary["n"], summary["metrics"], summary["primary_metric"],
                   summary.get("timing", {}).get("seconds", 0.0), records, Path(folder), summary.get("split", "test"))

    @property
    def score(self) -> float:
        return self.metrics[self.primary_metric]["mean"]

    def line(self) -> str:
        m = self.metrics[self.primary_metric]
        where = self.task if self.split == "test" else f"{self.task} ({self.split})"
        return (
            f"{where} {self.primary_metric} = {100 * m['mean']:.1f}% "
            f"(95% CI {100 * m['ci_low']:.1f}-{100 * m['ci_high']:.1f}, n={self.n}, {self.seconds:.0f}s)"
        )


def select(examples: list[Example], limit: int | None, subset: str = "first", seed: int = 0) -> list[Example]:
    """The evaluation subset: the first ``limit`` items, or a seeded random sample of them."""
    if limit is None or limit >= len(examples):
        return list(examples)
    if subset == "first":
        return list(examples[:limit])
    return random.Random(seed).sample(list(examples), limit)


Z95 = 1.959964  # the normal distribution's two-sided 95% quantile


def normal_interval(values: list[float]) -> tuple[float, float]:
    """The normal 95% interval of the mean, unclamped."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / max(n - 1, 1)
    half = Z95 * math.sqrt(var / n)
    return mean - half, mean + half


def confidence_interval(values: list[float]) -> tuple[float, float]:
    """95% interval of the mean: Wilson's score interval for 0/1 scores, the normal one otherwise."""
    n = len(values)
    mean = sum(values) / n
    z = Z95
    if all(v in (0.0, 1.0) for v in values):
        denom = 1 + z * z / n
        centre = (mean + z * z / (2 * n)) / denom
        half = z * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n)) / denom
        return max(0.0, centre - half), min(1.0, centre + half)
    lo, hi = normal_interval(values)
    return max(0.0, lo), min(1.0, hi)


FAMILY_SEP = "/family="  # per-family metric names: "exact_match_flexible/family=weekdays"


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and 95% CI of every metric, each over the records that have it (a cross-task validation set
    mixes tasks with different metrics; all of them have the primary one); then, where records carry a
    ``family``, every metric per family (``<metric>/family=<family>``, in order of first appearance)."""
    out = _metrics(records, len(records), "")
    families = list(dict.fromkeys(r["family"] for r in records if "family" in r))
    for family in families:
        out |= _metrics([r for r in records if r.get("family") == family], 0, f"{FAMILY_SEP}{family}")
    return out


def _metrics(records: list[dict[str, Any]], total: int, suffix: str) -> dict[str, dict[str, float]]:
    """Mean and CI per metric over ``records``, named ``<metric><suffix>``; ``n`` where fewer than ``total``."""
    out = {}
    for name in dict.fromkeys(name for r in records for name in r["scores"]):
        values = [r["scores"][name] for r in records if name in r["scores"]]
        lo, hi = confidence_interval(values)
        out[name + suffix] = {"mean": sum(values) / len(values), "ci_low": lo, "ci_high": hi}
        if len(values) < total or not total:
            out[name + suffix]["n"] = len(values)
    return out


def evaluate(
    predictor: Predictor,
    task: Task,
    examples: list[Example],
    *,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    likelihood: bool = True,
    out_dir: str | os.PathLike | None = None,
    config: dict[str, Any] | None = None,
    progress: bool = True,
    split: str = "test",
    stoppable: bool = True,
    extra_files: dict[str, str] | None = None,
) -> EvalResult:
    """Scores ``predictor`` on ``examples`` of ``task``; writes a results folder when ``out_dir`` is given,
    with ``extra_files`` (name -> text, e.g. the run's ``config.yaml``) in it. ``split`` names the split the
    examples come from (recorded in the summary; ``rescore`` reloads it).

    ``stoppable``: a SIGTERM / SIGINT stops the evaluation between two batches (a trainer's validation
    passes False: it stops at its own next step boundary instead).
    """
    if not examples:
        raise MetatunerError(f"nothing to evaluate: no examples of task {task.name!r}")
    final = Path(out_dir) if out_dir is not None else None
    if final is not None and files.is_nonempty_dir(final):
        raise folder_taken(final)
    budget = max_new_tokens or predictor.budget(task)
    start = time.perf_counter()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].query))
    records: list[dict[str, Any] | None] = [None] * len(examples)
    new_tokens = 0
    with tqdm(total=len(examples), desc=f"eval {task.name}", unit="ex", disable=not progress) as bar:
        for b in range(0, len(order), batch_size):
            if stoppable:
                interrupts.check(f"during the evaluation of {task.name} ({b} of {len(order)} done); nothing written")
            idx = order[b : b + batch_size]
            batch = [examples[i] for i in idx]
            preds = predictor.predict(task, batch, budget)
            choice_lp = predictor.choice_logprobs(task, batch) if likelihood else None
            for j, (i, ex, p) in enumerate(zip(idx, batch, preds, strict=True)):
                extracted, scores = task.grade(p.output, ex)
                rec = {
                    "id": ex.id,
                    "instruction": p.instruction,
                    "input": p.rendered,
                    "output": p.output,
                    "extracted": extracted,
                    "gold": ex.answer,
                    "scores": scores,
                }
                if "family" in ex.meta:
                    rec["family"] = ex.meta["family"]
                if choice_lp is not None:
                    rec["choice_logprobs"] = choice_lp[j]
                    best = max(range(len(choice_lp[j])), key=choice_lp[j].__getitem__)
                    rec["scores"]["accuracy_likelihood"] = float(best == ex.meta["label"])
                records[i] = rec
                new_tokens += p.new_tokens
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    done = [r for r in records if r is not None]
    result = EvalResult(task.name, len(done), summarize(done), task.primary_metric, seconds, done, split=split)
    if final is not None:
        summary = {
            "task": task.name,
            "split": split,
            "task_version": task.version,
            "n": result.n,
            "primary_metric": task.primary_metric,
            "metrics": result.metrics,
            "predictor": predictor.describe(),
            "config": config or {},
            "timing": {
                "seconds": seconds,
                "seconds_per_example": seconds / result.n,
                "new_tokens": new_tokens,
                "new_tokens_per_second": new_tokens / seconds if seconds > 0 else None,
            },
            "environment": environment(),
        }
        write_results_folder(final, done, summary, extra_files)
        result.out_dir = final
    return result


def rescore(results_dir: str | os.PathLike, task: Task) -> EvalResult:
    """Re-extracts and re-scores a results folder's outputs with the task's current code, in place.

    Generation is not repeated: after a fix to answer extraction or to a metric, the stored outputs are
    graded again. Option log-probabilities, where stored, are kept and re-scored too. The summary
    records the task version used and that it was re-scored.
    """
    folder = Path(results_dir)
    summary, records = read_results_folder(folder)
    if summary.get("task") != task.name:
        raise MetatunerError(f"{folder} holds results of task {summary.get('task')!r}, not {task.name!r}")
    split = summary.get("split", "test")
    examples = {ex.id: ex for ex in task.load(split)}
    missing = [r["id"] for r in records if r["id"] not in examples]
    if missing:
        raise MetatunerError(f"{folder}: {len(missing)} record ids (e.g. {missing[0]}) are not in the {split} split")
    for rec in records:
        ex = examples[rec["id"]]
        rec["extracted"], rec["scores"] = task.grade(rec["output"], ex)
        if "choice_logprobs" in rec:
            best = max(range(len(rec["choice_logprobs"])), key=rec["choice_logprobs"].__getitem__)
            rec["scores"]["accuracy_likelihood"] = float(best == ex.meta["label"])
    metrics = summarize(records)
    summary.update(metrics=metrics, task_version=task.version,
                   rescored={"at": time.strftime("%Y-%m-%d %H:%M:%S"), "environment": environment()})
    # records and summary change together: a new copy of the folder replaces the old one
    with files.staged_folder(folder) as tmp:
        for entry in folder.iterdir():
            if entry.is_file() and entry.name not in ("records.jsonl", "summary.json"):
                files.write_new(tmp / entry.name, entry.read_bytes())
        _write_records_and_summary(tmp, records, summary)
        files.replace_folder(tmp, folder)
    return EvalResult(task.name, len(records), metrics, task.primary_metric, summary["timing"]["seconds"],
                      records, folder, split)


def write_results_folder(final: Path, records: list[dict[str, Any]], summary: dict[str, Any],
                         extra: dict[str, str] | None = None) -> None:
    """Writes records, summary and the ``extra`` files (name -> text) under a temporary name, then renames
    the folder into place."""
    with files.new_folder(final) as tmp:
        _write_records_and_summary(tmp, records, summary)
        for name, text in (extra or {}).items():
            files.write_new(tmp / name, text)


def _write_records_and_summary(folder: Path, records: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    files.write_new(folder / "records.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    files.write_new(folder / "summary.json", json.dumps(summary, indent=2))


def read_results_folder(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary, records) of a results folder; a missing or malformed file is one clear error."""
    folder = Path(folder)
    files.sweep(folder)  # a rescore killed between its two renames left the old folder aside
    if not (folder / "summary.json").is_file():
        raise MetatunerError(f"{folder} is not a results folder (no summary.json)")
    summary = files.read_json(folder / "summary.json")
    if not isinstance(summary, dict):
        raise MetatunerError(f"{folder / 'summary.json'} does not hold a results summary")
    try:
        lines = (folder / "records.jsonl").read_text(encoding="utf-8").splitlines()
        records = [json.loads(line) for line in lines]
    except (OSError, ValueError) as e:
        raise MetatunerError(f"cannot read {folder / 'records.jsonl'}: {e}") from None
    return summary, records


def environment() -> dict[str, Any]:
    """Package versions, Python and platform, and the git state of the working directory."""
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "git": git_state(Path(__file__).resolve().parent),
    }


def git_state(where: Path) -> dict[str, Any] | None:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where, capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}
