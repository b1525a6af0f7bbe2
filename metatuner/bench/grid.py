"""The benchmark grid: methods x tasks x seeds under one protocol, resumable cell by cell.

A protocol file (``metatuner/configs/bench/cpu.yaml``) names the tasks, the seeds, the methods with
their config overrides, and the overrides every cell shares. Each cell is one ``eval_method`` run:
the method is fitted on the task's train split (validation carved from train, seeded) and scored on
the same test subset by the one evaluation harness. A cell's results folder appears only when the
cell is complete, so a rerun skips finished cells and an interrupted grid loses at most the cell in
progress. After every cell ``results.json`` is rebuilt from all finished cells. A SIGTERM or SIGINT
stops the grid at the next safe point of the cell in progress (:mod:`metatuner.interrupts`): finished
cells stay, the interrupted one is released, and rerunning the same command continues.

Several grid processes may work on one folder at once (``--workers N`` starts them; separate
invocations work too): a process claims a cell by locking a file under ``claims/`` that holds its pid
(:mod:`metatuner.locks`), skips cells another live process holds, and takes over the claims of processes
that died; of several processes racing for one claim exactly one wins.

Several test splits (``eval.splits``, e.g. ``[test, test_shift]`` for the built-in tasks' template-shift
test): a cell fits its method once and scores it on each split; the first split's results are the cell's
folder, each other split's go beside it (``<cell>@test_shift``) and are written before it, so a cell is
done when its folder is. In ``results.json`` each split is a row of its own, under the task name
``<task>@<split>`` (the first split ``test`` keeps the plain task name), so the report shows
``arithmetic`` and ``arithmetic@test_shift`` as columns side by side, each paired by item and seed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metatuner import files, interrupts, locks
from metatuner.bench import tuning
from metatuner.bench.tuning import Tuning, chosen
from metatuner.config import RunConfig, from_dict, merge, parse_overrides, read_yaml_mapping
from metatuner.errors import MetatunerError
from metatuner.tasks import get_task

SHIPPED_BENCH = Path(__file__).resolve().parent.parent / "configs" / "bench"


@dataclass
class Protocol:
    name: str
    tasks: list[str]
    seeds: list[int]
    methods: dict[str, dict[str, Any]]
    common: dict[str, Any] = field(default_factory=dict)
    per_task: dict[str, dict[str, Any]] = field(default_factory=dict)
    tune: Tuning | None = None  # fair tuning of the methods' learning rates (:mod:`metatuner.bench.tuning`)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] = ()) -> "Protocol":
        """Reads a protocol file (or a shipped one by name); ``overrides`` are ``key=value`` on its keys,
        e.g. ``common.eval.limit=4`` or ``seeds=[0]``."""
        p = Path(path)
        if not p.is_file():
            named = SHIPPED_BENCH / f"{Path(str(path)).stem}.yaml"
            if not named.is_file():
                names = ", ".join(shipped_protocols())
                raise MetatunerError(f"protocol file not found: {p} (shipped protocols: {names})")
            p = named
        data = merge(read_yaml_mapping(p, "protocol file"), parse_overrides(list(overrides)))
        allowed = {"name", "tasks", "seeds", "methods", "common", "per_task", "tune"}
        unknown = sorted((k for k in data if k not in allowed), key=str)
        if unknown:
            raise MetatunerError(f"{p}: unknown protocol key {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
        for key in ("tasks", "seeds", "methods"):
            if not data.get(key):
                raise MetatunerError(f"{p}: protocol needs a non-empty {key!r}")
        protocol = cls(
            name=str(data.get("name", p.stem)), tasks=_strings(data["tasks"], p, "tasks"), seeds=_seeds(data["seeds"], p),
            methods=_mapping_of_mappings(data["methods"], p, "methods"), common=_mapping(data.get("common"), p, "common"),
            per_task=_mapping_of_mappings(data.get("per_task"), p, "per_task"), tune=Tuning.parse(data.get("tune"), p),
        )
        for method, (_, values) in (protocol.tune.methods.items() if protocol.tune else ()):
            if method not in protocol.methods:
                raise MetatunerError(f"{p}: tune.methods names {method!r}, which is not among the protocol's methods")
            for task in protocol.tasks:  # every tuning run's config must be valid before any work starts
                for value in values:
                    protocol.tuning_config(task, method, value)
        for cell in protocol.cells():  # every cell's config and test splits must be valid before any work starts
            cfg = protocol.config(*cell)
            task = get_task(cfg.data.task)
            for split in cfg.eval.splits:
                task.check_split(split)
        return protocol

    def cells(self, only: list[str] | None = None) -> list[tuple[str, str, int]]:
        """``(task, method, seed)`` of every cell, or of the cells of the methods in ``only``."""
        return [(t, m, s) for t in self.tasks for m in self.methods for s in self.seeds if not only or m in only]

    def config(self, task: str, method: str, seed: int, out: Path | None = None):
        """The resolved RunConfig of one cell: common, then per-task, then per-method overrides, then the
        value tuning chose for the method (recorded in ``out``'s ``tuning/``)."""
        return from_dict(RunConfig, self._overrides(task, method, seed, out))

    def _overrides(self, task: str, method: str, seed: int, out: Path | None = None) -> dict[str, Any]:
        overrides = merge(merge(nest(self.common), nest(self.per_task.get(task, {}))), nest(self.methods[method]))
        if out is not None:
            overrides = merge(overrides, nest(chosen(out, file_name(task), method)))
        overrides.setdefault("method", method)
        return merge(overrides, {"data": {"task": task, "seed": seed}, "seed": seed})

    def tuning_config(self, task: str, method: str, value: Any, data_dir: str | None = None) -> RunConfig:
        """The RunConfig of one tuning run: the cell's config at ``tune.seed``, then ``tune.overrides``,
        then ``value`` for the method's tuned key."""
        spec = self.tune
        key, _ = spec.methods[method]
        overrides = merge(merge(self._overrides(task, method, spec.seed), nest(spec.overrides)), nest({key: value}))
        if data_dir:
            overrides = merge(overrides, {"data": {"data_dir": data_dir}})
        return from_dict(RunConfig, overrides)


def _strings(value, p: Path, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise MetatunerError(f"{p}: protocol key {key!r} must be a list of names, got {value!r:.80}")
    return list(value)


def _seeds(value, p: Path) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise MetatunerError(f"{p}: protocol key 'seeds' must be a list of integers, got {value!r:.80}")
    return list(value)


def _mapping(value, p: Path, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise MetatunerError(f"{p}: protocol key {key!r} must be a mapping of names, got {value!r:.80}")
    return dict(value)


def _mapping_of_mappings(value, p: Path, key: str) -> dict[str, dict[str, Any]]:
    return {k: _mapping(v, p, f"{key}.{k}") for k, v in _mapping(value, p, key).items()}


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"train.steps": 3}`` -> ``{"train": {"steps": 3}}`` (nested dicts pass through)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = nest(value) if isinstance(value, dict) else value
    return out


def shipped_protocols() -> list[str]:
    """Names of the protocols shipped in ``metatuner/configs/bench/``."""
    return sorted(f.stem for f in SHIPPED_BENCH.glob("*.yaml"))


def file_name(task: str) -> str:
    """A task name usable in a path everywhere: a cross-task mix's '>' is not allowed in Windows paths
    (``math+cosmosqa>gsm8k`` -> ``math+cosmosqa-to-gsm8k``), and a spec file counts by its name
    (``file:/data/capitals.yaml`` -> ``capitals``)."""
    return re.sub(r"file:([^+>]+)", lambda m: Path(m.group(1).strip()).stem, task).replace(">", "-to-")


def cell_dir(out: Path, task: str, method: str, seed: int) -> Path:
    return out / "cells" / f"{file_name(task)}--{method}--seed{seed}"


def claim(out: Path, folder: Path | str) -> locks.Lock | None:
    """Claims a cell (its folder) or a tuning job (its name) for this process (release it with
    ``.release()``); None when another live process holds it. The claim of a process that died is taken over."""
    name = folder if isinstance(folder, str) else folder.name
    return locks.try_lock(files.make_dirs(out / "claims") / f"{name}.claim")


def run_grid(protocol: Protocol, out: Path, data_dir: str | None = None, only: list[str] | None = None,
             workers: int = 1) -> list[dict]:
    """Runs every unfinished cell in order (``workers`` processes at once); returns the rows of ``results.json``."""
    files.make_dirs(out)
    spec = yaml.safe_dump(to_protocol_dict(protocol), sort_keys=False)
    if not (out / "protocol.yaml").is_file() or (out / "protocol.yaml").read_text() != spec:  # workers rewrite it
        files.write_text(out / "protocol.yaml", spec)
    if workers > 1:  # the workers share the tuning runs out between them, then the cells
        return _run_workers(protocol, out, data_dir, only, workers)
    from metatuner.recipes import eval_method

    # before the cells: every tuning run not on file and not claimed by another process (a worker)
    tune(protocol, out, data_dir, only)
    waiting = set(tuning_pending(protocol, out, only))  # tuned by another worker right now
    cells = sorted(protocol.cells(only), key=lambda c: (c[0], c[1]) in waiting)  # those cells go last
    for i, (task, method, seed) in enumerate(cells, 1):
        interrupts.check(f"before cell {i} of {len(cells)}; finished cells are kept in {out}; rerun the same "
                         "command to continue")
        folder = cell_dir(out, task, method, seed)
        if (folder / "summary.json").is_file():
            print(f"[{i}/{len(cells)}] {task} {method} seed {seed}: done, skipped")
            continue
        if (task, method) in waiting:  # the cell needs the choice: wait for it (or tune it, if its tuner died)
            _await_tuning(protocol, out, data_dir, task, method)
        held = claim(out, folder)
        if held is None:
            print(f"[{i}/{len(cells)}] {task} {method} seed {seed}: running in another process, skipped")
            continue
        files.sweep(folder)  # what a process that died while writing this cell left
        if (folder / "summary.json").is_file():  # finished by another process just before the claim
            held.release()
            continue
        for pattern in (f"{folder.name}@*", f"{folder.name}.b*"):  # other splits and learning-curve points
            for stale in folder.parent.glob(pattern):  # of an attempt that did not finish
                shutil.rmtree(stale)
        cfg = protocol.config(task, method, seed, out)
        if data_dir:
            cfg.data.data_dir = data_dir
        print(f"[{i}/{len(cells)}] {task} {method} seed {seed} ...", flush=True)
        start = time.perf_counter()
        try:
            results = eval_method(cfg, folder)
            total = time.perf_counter() - start
            scoring = sum(r.seconds for r in results)
            files.write_json(folder / "cell.json", {"total_seconds": total, "fit_seconds": total - scoring,
                                                    "eval_seconds": scoring}, indent=None)
            for result in results:
                print(f"    {result.line()}", flush=True)
        except MetatunerError:
            raise
        except interrupts.Stopped as e:
            raise interrupts.Stopped(e.signum, f"in cell {folder.name} ({e.detail}); finished cells are kept in "
                                     f"{out}; rerun the same command to continue") from None
        except Exception as e:  # noqa: BLE001 - one failed cell must not lose the rest of the grid
            error = {"task": task, "method": method, "seed": seed, "error": f"{type(e).__name__}: {e}",
                     "traceback": traceback.format_exc(), "seconds": time.perf_counter() - start}
            files.write_json(out / "errors" / f"{folder.name}.json", error)
            print(f"    FAILED: {error['error']} (see {out / 'errors'})", flush=True)
        finally:
            held.release()
        collect(out)
    return collect(out)


def _choice_file(out: Path, task: str, method: str) -> Path:
    return tuning.choice_path(out, file_name(task), method)


def tuning_jobs(protocol: Protocol, only: list[str] | None = None) -> list[tuple[str, str]]:
    """The (task, method) pairs ``protocol.tune`` tunes (the methods in ``only``, if given), in order."""
    spec = protocol.tune
    if spec is None:
        return []
    return [(t, m) for t in protocol.tasks for m in protocol.methods if m in spec.methods and (not only or m in only)]


def tuning_pending(protocol: Protocol, out: Path, only: list[str] | None = None) -> list[tuple[str, str]]:
    """The tuning jobs with no choice on file yet."""
    return [(t, m) for t, m in tuning_jobs(protocol, only)
            if not _choice_file(out, t, m).is_file()]


def _await_tuning(protocol: Protocol, out: Path, data_dir: str | None, task: str, method: str) -> None:
    """Blocks until the tuning choice of (task, method) is on file; runs it here if nobody holds it."""
    while not _choice_file(out, task, method).is_file():
        interrupts.check(f"waiting for the tuning of {method} on {task}; finished cells are kept in {out}; rerun "
                         "the same command to continue")
        tune(protocol, out, data_dir, [method], quiet=True)  # claims and runs it when its tuner has died
        time.sleep(5)


def tune(protocol: Protocol, out: Path, data_dir: str | None = None, only: list[str] | None = None,
         quiet: bool = False) -> list[dict]:
    """Runs the tuning of every (task, method) of ``protocol.tune`` (the methods in ``only``, if given) that
    has no choice on file yet (:mod:`metatuner.bench.tuning`); returns the choice records on file. Before
    any cell. Each job is claimed like a cell, so grid workers share the jobs out: a job another live
    process holds is skipped here (the caller waits for its choice before the cells that need it)."""
    records = []
    for task, method in tuning_jobs(protocol, only):
        path = _choice_file(out, task, method)
        if path.is_file():
            records.append(files.read_json(path))
            continue
        held = claim(out, f"tuning--{file_name(task)}--{method}")
        if held is None:
            if not quiet:
                print(f"    tuning {method} on {task}: running in another process, skipped", flush=True)
            continue
        try:
            if path.is_file():  # chosen by another process just before the claim
                records.append(files.read_json(path))
                continue
            records.append(_tune_one(protocol, out, data_dir, task, method))
        finally:
            held.release()
    return records


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
    best = tuning.pick([t["val_score"] for t in tried], values, tuning.current(protocol.config(task, method, spec.seed), key))
    record = {"task": task, "method": method, "key": key, "chosen": values[best], "seed": spec.seed,
              "overrides": spec.overrides, "tried": tried, "seconds": sum(t["fit_seconds"] for t in tried)}
    files.write_json(_choice_file(out, task, method), record)
    return record


def _run_workers(protocol: Protocol, out: Path, data_dir: str | None, only: list[str] | None,
                 workers: int) -> list[dict]:
    """Starts ``workers`` grid processes on ``out`` (each claims tuning jobs, then cells, as it goes), shows
    progress over all of them, and waits. Each worker's output goes to ``out/logs/worker-<k>.log``; CPU threads are
    split between them unless ``OMP_NUM_THREADS`` is set."""
    from tqdm.auto import tqdm

    cells = protocol.cells(only)
    logs = files.make_dirs(out / "logs")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    # the workers read this process's protocol from a file of its own: another bench command on the same folder
    # may rewrite protocol.yaml while they run
    own = logs / f"protocol-{os.getpid()}.yaml"
    files.write_text(own, yaml.safe_dump(to_protocol_dict(protocol), sort_keys=False))
    cmd = [sys.executable, "-m", "metatuner.cli", "bench", "--config", str(own), "--out", str(out), "--no-report"]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    if only:
        cmd += ["--only", *only]
    procs = []
    for k in range(workers):
        with (logs / f"worker-{k}.log").open("a") as log:
            # a session of its own: a signal reaches a worker once, forwarded by this process, never twice
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
            time.sleep(1.0)  # staggered starts: each claims a different first cell
    jobs = tuning_jobs(protocol, only)  # the workers run these first, each claiming one at a time

    def done() -> int:
        return (sum((cell_dir(out, *c) / "summary.json").is_file() for c in cells)
                + sum(_choice_file(out, t, m).is_file() for t, m in jobs))

    what = "tuning jobs + cells" if jobs else "cells"
    bar = tqdm(total=len(cells) + len(jobs), initial=done(), desc=f"{what} ({workers} workers, logs in {logs})",
               unit="job")
    # on a terminal the bar ticks every second; in a log file (nohup, CI) it writes a line per finished job
    # only, not one per second for hours
    tty = sys.stderr.isatty()
    try:
        while any(p.poll() is None for p in procs):
            signum = interrupts.requested()
            if signum is not None:  # each worker stops at its next safe point and releases its cell
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signum)
                for p in procs:
                    p.wait()
                interrupts.check(f"(and its {workers} workers); finished cells are kept in {out}; rerun the "
                                 "same command to continue")
            time.sleep(1)
            finished = done()
            if tty or finished != bar.n:
                bar.update(finished - bar.n)
    except KeyboardInterrupt:  # a second signal: stop the workers at once
        for p in procs:
            p.kill()
        raise
    bar.update(done() - bar.n)
    bar.close()
    failed = [k for k, p in enumerate(procs) if p.returncode != 0]
    if failed:
        raise MetatunerError(f"grid worker(s) {failed} exited with an error; see {logs}")
    return collect(out)


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


def to_protocol_dict(p: Protocol) -> dict[str, Any]:
    return {"name": p.name, "tasks": p.tasks, "seeds": p.seeds, "methods": p.methods, "common": p.common,
            "per_task": p.per_task, **({"tune": p.tune.to_dict()} if p.tune else {})}
