"""Fair tuning: each method's learning rate chosen on validation, at a short budget, before the grid's cells.

A protocol's optional ``tune`` section names, per method, one config key and the values to try, plus the
overrides every tuning run shares (a short budget, and optionally a larger validation carve)::

    tune:
      seed: 0                                  # the training seed of the tuning runs
      overrides: {train.steps: 6, dpo.steps: 6}
      methods:
        sft: {train.lr_scale: [0.3, 1.0, 3.0]}
        dpo: {dpo.lr: [3.0e-4, 1.0e-3, 3.0e-3]}

For each (task, method) every value is one fit of the method (the cell's config, then ``overrides``, then
the value) on the train split, scored on the validation items carved from train (``data.val_size``,
seeded): test items are never read. The value with the best mean primary metric is chosen (ties go to
the value the method's own config already has, else to the first listed) and the cells of that task and
method run with it. Each choice is written, with every value's validation score and fit seconds, to
``tuning/<task>--<method>.json`` in the grid folder, once: a rerun reuses it, and the report shows it.
The tuning runs' seconds are part of what the method cost: the report's cost table shows them.

Each (task, method) is a job claimed like a cell (:mod:`metatuner.bench.cells`), so grid workers and Ray
tasks share the jobs out: a job another live process holds is skipped, and a cell that needs its choice
waits for it, or runs it itself when its tuner died.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from metatuner import files, interrupts
from metatuner.bench.cells import claim, file_name
from metatuner.bench.protocol import Protocol
from metatuner.errors import MetatunerError


def choice_path(out: Path, task_file: str, method: str) -> Path:
    """Where the tuning choice of (task, method) is written in grid folder ``out``."""
    return out / "tuning" / f"{task_file}--{method}.json"


def chosen(out: Path, task_file: str, method: str) -> dict[str, Any]:
    """The tuned ``{key: value}`` of a (task, method), or {} when it was not tuned."""
    path = choice_path(out, task_file, method)
    if not path.is_file():
        return {}
    record = files.read_json(path)
    return {record["key"]: record["chosen"]}


def current(cfg, key: str) -> Any:
    """The value of config key ``key`` (``train.lr_scale``) in ``cfg``."""
    node = cfg
    for part in key.split("."):
        node = getattr(node, part, None)
    return node


def pick(scores: list[float], values: list[Any], current: Any) -> int:
    """The index of the best score; ties go to ``current`` (the config's own value) if it is among them,
    else to the first listed."""
    best = max(scores)
    tied = [i for i, s in enumerate(scores) if s == best]
    return next((i for i in tied if values[i] == current), tied[0])


def records(out: Path) -> list[dict[str, Any]]:
    """Every tuning choice on file in grid folder ``out``."""
    folder = out / "tuning"
    return [files.read_json(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def tuning_seconds(out: Path) -> dict[str, float]:
    """Method -> seconds of its tuning runs, per task (mean over tasks)."""
    per: dict[str, list[float]] = {}
    for r in records(out):
        per.setdefault(r["method"], []).append(r["seconds"])
    return {m: sum(v) / len(v) for m, v in per.items()}


def tuning_table(out: Path) -> str:
    """The report's section on the tuning: per (task, method), each value's validation score and the choice."""
    done = records(out)
    if not done:
        return ""
    lines = ["Tuning (each value one fit at the tuning budget, scored on validation items carved from train; "
             "test never read):", "", "| task | method | key | validation score per value (%) | chosen | seconds |",
             "|---|---|---|---|---|---|"]
    for r in done:
        tried = ", ".join(f"{t['value']}: {100 * t['val_score']:.1f}" for t in r["tried"])
        lines.append(f"| {r['task']} | {r['method']} | {r['key']} | {tried} (n={r['tried'][0]['n']}) | "
                     f"{r['chosen']} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def choice_file(out: Path, task: str, method: str) -> Path:
    """The choice record of (task, method) in grid folder ``out``, by task name."""
    return choice_path(out, file_name(task), method)


def tuning_jobs(protocol: Protocol, only: list[str] | None = None) -> list[tuple[str, str]]:
    """The (task, method) pairs ``protocol.tune`` tunes (the methods in ``only``, if given), in order."""
    spec = protocol.tune
    if spec is None:
        return []
    return [(t, m) for t in protocol.tasks for m in protocol.methods if m in spec.methods and (not only or m in only)]


def tuning_pending(protocol: Protocol, out: Path, only: list[str] | None = None) -> list[tuple[str, str]]:
    """The tuning jobs with no choice on file yet."""
    return [(t, m) for t, m in tuning_jobs(protocol, only) if not choice_file(out, t, m).is_file()]


def tune(protocol: Protocol, out: Path, data_dir: str | None = None, only: list[str] | None = None,
         quiet: bool = False) -> list[dict]:
    """Runs the tuning of every (task, method) of ``protocol.tune`` (the methods in ``only``, if given) that
    has no choice on file yet; returns the choice records on file. Before any cell. A job another live
    process holds is skipped here (the caller waits for its choice before the cells that need it)."""
    records = []
    for task, method in tuning_jobs(protocol, only):
        record = tune_job(protocol, out, data_dir, task, method, quiet)
        if record is not None:
            records.append(record)
    return records


def tune_job(protocol: Protocol, out: Path, data_dir: str | None, task: str, method: str,
             quiet: bool = False) -> dict | None:
    """The choice record of one tuning job: read from file, or run here under a claim; None when another
    live process holds the job."""
    path = choice_file(out, task, method)
    if path.is_file():
        return files.read_json(path)
    held = claim(out, f"tuning--{file_name(task)}--{method}")
    if held is None:
        if not quiet:
            print(f"    tuning {method} on {task}: running in another process, skipped", flush=True)
        return None
    try:
        if path.is_file():  # chosen by another process just before the claim
            return files.read_json(path)
        return _tune_one(protocol, out, data_dir, task, method)
    finally:
        held.release()


def await_tuning(protocol: Protocol, out: Path, data_dir: str | None, task: str, method: str) -> None:
    """Blocks until the tuning choice of (task, method) is on file; runs it here if nobody holds it."""
    while not choice_file(out, task, method).is_file():
        interrupts.check(f"waiting for the tuning of {method} on {task}; finished cells are kept in {out}; rerun "
                         "the same command to continue")
        tune(protocol, out, data_dir, [method], quiet=True)  # claims and runs it when its tuner has died
        time.sleep(5)


def _tune_one(protocol: Protocol, out: Path, data_dir: str | None, task: str, method: str) -> dict:
    """Fits (task, method) once per value of its tuned key, scores each fit on the validation items carved
    from train, and writes the choice record (returned)."""
    from tqdm.auto import tqdm

    from metatuner.evaluation.harness import evaluate
    from metatuner.recipes import fit_method, train_val_split

    spec = protocol.tune
    key, values = spec.methods[method]
    tried = []
    for value in tqdm(values, desc=f"tuning {method} {key} on {task}", unit="value"):
        cfg = protocol.tuning_config(task, method, value, data_dir)
        start = time.perf_counter()
        predictor, task_obj = fit_method(cfg)
        seconds = time.perf_counter() - start
        _, val = train_val_split(task_obj.load("train"), cfg.data.train_limit, cfg.data.val_size, cfg.data.seed)
        if not val:
            raise MetatunerError(f"tuning {method} on {task} needs validation items: set data.val_size > 0")
        result = evaluate(predictor, task_obj, val, batch_size=cfg.eval.batch_size,
                          max_new_tokens=cfg.eval.max_new_tokens, likelihood=cfg.eval.likelihood,
                          progress=False, split="val")
        score = result.metrics[task_obj.primary_metric]["mean"]
        tried.append({"value": value, "val_score": score, "n": len(val), "fit_seconds": seconds})
        print(f"    tuning {method} on {task}: {key}={value} -> val {100 * score:.1f}% ({seconds:.0f} s)", flush=True)
    best = pick([t["val_score"] for t in tried], values, current(protocol.config(task, method, spec.seed), key))
    record = {"task": task, "method": method, "key": key, "chosen": values[best], "seed": spec.seed,
              "overrides": spec.overrides, "tried": tried, "seconds": sum(t["fit_seconds"] for t in tried)}
    files.write_json(choice_file(out, task, method), record)
    return record
