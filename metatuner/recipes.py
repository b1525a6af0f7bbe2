"""Recipes: the end-to-end jobs behind the CLI commands, as plain functions.

Each recipe resolves its inputs (task, splits, model, method), runs, and writes a run folder holding
the resolved config and the results. The CLI only parses arguments and calls these.

A run folder has one owner: a lock file ``run.lock`` (:mod:`metatuner.locks`) held while a process trains
in it. A new run folder appears at once with its ``config.yaml`` and lock (:func:`run_folder`), so a
crash leaves either no folder or one that ``metatuner train --resume`` continues.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from metatuner import files, locks
from metatuner.config import RunConfig, config_text, save_config, to_dict
from metatuner.errors import MetatunerError, folder_taken
from metatuner.evaluation.generation import tokens_generated
from metatuner.evaluation.harness import EvalResult, evaluate, select
from metatuner.evaluation.predictors import Predictor
from metatuner.methods import get_method
from metatuner.models.loading import load_model, process_state
from metatuner.tasks import Example, Task, get_task
from metatuner.training.build import build_metatuner  # noqa: F401 - re-exported: callers import it from here too


RUN_LOCK = "run.lock"


class RunFolderExists(MetatunerError):
    """A new run folder's name is taken by a folder that is not empty."""

    def __init__(self, run_dir: Path):
        super().__init__(f"run folder {run_dir} already exists and is not empty; resume it, or choose another folder")
        self.run_dir = run_dir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def new_run_dir(parent: str | Path, kind: str, task: str) -> Path:
    """A fresh folder name ``<parent>/<kind>-<task>-<timestamp>`` (not created)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(parent) / f"{kind}-{task}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = Path(parent) / f"{kind}-{task}-{stamp}-{n}"
    return path


def train_val_split(examples: list[Example], limit: int | None, val_size: int, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded shuffle of the train split, cut into (train, validation); test is never touched."""
    items = list(examples)
    random.Random(seed).shuffle(items)
    if val_size >= len(items):
        raise MetatunerError(f"data.val_size={val_size} leaves no training items (train has {len(items)})")
    val, train = items[:val_size], items[val_size:]
    return (train[:limit] if limit else train), val


def split_dir(out_dir: Path, split: str) -> Path:
    """Where the results of one more test split go: beside ``out_dir``, as ``<out_dir>@<split>``."""
    return out_dir.with_name(f"{out_dir.name}@{split}")


def eval_predictor(predictor, task, cfg: RunConfig, out_dir: Path | None, progress: bool = True,
                   split: str | None = None, extra_files: dict[str, str] | None = None) -> EvalResult:
    """Scores any predictor on the configured subset of one test split of ``task`` (default: the first of
    ``eval.splits``): the one evaluation path. The results folder holds the resolved ``config.yaml`` and
    ``extra_files`` (name -> text), written with it."""
    split = split or cfg.eval.splits[0]
    test = select(task.load(split), cfg.eval.limit, cfg.eval.subset, cfg.eval.seed)
    return evaluate(
        predictor, task, test, batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
        likelihood=cfg.eval.likelihood, out_dir=out_dir, config=to_dict(cfg), progress=progress, split=split,
        extra_files={"config.yaml": config_text(cfg), **(extra_files or {})},
    )


def refuse_existing(out_dir: Path | None) -> None:
    """Stops before any work when the results folder ``out_dir`` exists and is not empty."""
    if out_dir is not None and files.is_nonempty_dir(out_dir):
        raise folder_taken(out_dir)


def eval_splits(predictor, task, cfg: RunConfig, out_dir: Path | None, progress: bool = True,
                extra_files: dict[str, str] | None = None, splits: list[str] | None = None,
                reuse: bool = False) -> list[EvalResult]:
    """Scores a predictor on every split of ``splits`` (default ``eval.splits``; in that order): the first into
    ``out_dir``, each other into :func:`split_dir`. ``out_dir`` is written last, so its appearing means all are
    done. ``reuse``: a split whose folder is already complete (scored by an earlier attempt of a resumed fit)
    is read back, not scored again."""
    first, *others = splits or cfg.eval.splits

    def score(split: str, folder: Path | None) -> EvalResult:
        if reuse and folder is not None and (folder / "summary.json").is_file():
            return EvalResult.load(folder)
        return eval_predictor(predictor, task, cfg, folder, progress, split, extra_files)

    results = {s: score(s, split_dir(out_dir, s) if out_dir else None) for s in others}
    results[first] = score(first, out_dir)
    return [results[s] for s in [first, *others]]


def budget_dir(out_dir: Path, step: int) -> Path:
    """Where a learning curve's results at optimizer step ``step`` go: beside ``out_dir``, as ``<out_dir>.b<step>``."""
    return out_dir.with_name(f"{out_dir.name}.b{step}")


def eval_method(cfg: RunConfig, out_dir: Path | None, resume: bool = False) -> list[EvalResult]:
    """Fits ``cfg.method`` (zero-shot, cot, ...) once and scores it on every split of ``eval.splits``.

    With ``eval.budgets`` (a learning curve) a trained method is also scored at those optimizer steps of
    its fit, into :func:`budget_dir` folders (on ``eval.budget_splits``, default all). Every results folder
    holds a ``budget.json`` (:func:`budget_file`): the optimizer steps, fit seconds and decoded tokens behind
    its predictor (earlier points' scoring excluded) and the parameters trained, so a method's budget is
    counted in full.

    ``resume``: an earlier attempt that stopped (a grid cell cut off by a signal or a session's end) is
    continued, not restarted, when its training folder (``<out_dir>-train``) holds an intact checkpoint of the
    same config and the method can resume (``Method.resumable``): training goes on from that checkpoint, the
    learning-curve points it had scored are kept, and the fit's clock goes on from where it stood at the
    checkpoint (:class:`FitClock`: the work lost after it, and the restart, are not counted). Otherwise the
    attempt starts over, removing what the earlier one left.
    """
    refuse_existing(out_dir)
    task = get_task(cfg.data.task, cfg.data.data_dir)
    for split in cfg.eval.splits:
        task.load(split)  # fail on bad data or an unknown split before loading the model
    # a trained method's logs and checkpoints go beside the results folder, which appears only when complete
    method_cls = get_method(cfg.method)
    train_dir = out_dir.with_name(out_dir.name + "-train") if out_dir is not None and method_cls.needs_training else None
    lock = own_train_dir(train_dir) if train_dir is not None else None
    try:
        at = resume_point(cfg, out_dir, train_dir) if resume and method_cls.resumable and train_dir else None
        if train_dir is not None and at is None:
            wipe_train_dir(train_dir)
            files.write_text(train_dir / ATTEMPT_CONFIG, config_text(cfg))
        elif at is not None:
            print(f"    resuming from the checkpoint at step {at} in {train_dir}", flush=True)
        clean_attempt(cfg, out_dir, at, cfg.train.steps)
        clock = FitClock(train_dir, at)
        scoring, scored_tokens, fitted = [0.0], [0], []

        def spent(steps: int, now: float) -> dict[str, str]:  # budget.json of the predictor trained this far
            params = fitted[0].trainable_params if fitted else 0
            fit_seconds, train_tokens = clock.read(now, scoring[0], scored_tokens[0])
            return budget_file(steps, fit_seconds, train_tokens, params)

        def on_budget(step: int, predictor) -> None:
            began, before = time.perf_counter(), tokens_generated()
            folder = budget_dir(out_dir, step) if out_dir is not None else None
            results = eval_splits(predictor, task, cfg, folder, False, spent(step, began), cfg.eval.budget_splits)
            scoring[0] += time.perf_counter() - began
            scored_tokens[0] += tokens_generated() - before
            print(f"    step {step}: " + "; ".join(r.line() for r in results), flush=True)

        def prepare(method) -> None:
            fitted.append(method)
            method.resume = at is not None
            method.on_step = lambda step: clock.tick(step, scoring[0], scored_tokens[0])
            if cfg.eval.budgets:  # the points an earlier attempt scored are kept
                method.on_budget = on_budget
                method.budgets = {b for b in cfg.eval.budgets if b < method.budget() and (at is None or b > at)}

        predictor, task = fit_method(cfg, train_dir, prepare=prepare)
        return eval_splits(predictor, task, cfg, out_dir, True, spent(fitted[0].budget(), time.perf_counter()),
                           reuse=at is not None)
    finally:
        if lock is not None:
            lock.release()


#: the config of the attempt whose checkpoints a training folder holds (a resume needs the same config)
ATTEMPT_CONFIG = "attempt-config.yaml"


def resume_point(cfg: RunConfig, out_dir: Path, train_dir: Path) -> int | None:
    """The step an earlier attempt of this fit can be continued from: that of the newest intact checkpoint in
    ``train_dir``, when the attempt ran this very config, its clock reached that step and every
    learning-curve point up to it is on file; None otherwise (the attempt starts over)."""
    from metatuner.training.checkpoint import checkpoint_step, latest_checkpoint

    saved = train_dir / ATTEMPT_CONFIG
    if not saved.is_file() or saved.read_text() != config_text(cfg):
        return None
    try:
        ckpt = latest_checkpoint(train_dir)
    except MetatunerError:  # every checkpoint damaged
        return None
    if ckpt is None:
        return None
    step = checkpoint_step(ckpt)
    if FitClock.reading(train_dir, step) is None:
        return None
    if any(not (budget_dir(out_dir, b) / "summary.json").is_file() for b in cfg.eval.budgets or () if b <= step):
        return None
    return step


def clean_attempt(cfg: RunConfig, out_dir: Path | None, at: int | None, total: int) -> None:
    """Removes the results an earlier attempt of this fit left beside ``out_dir`` (its learning-curve points
    and other splits), except, when it is resumed from step ``at``, the complete points up to ``at`` and
    (when its training had ended) the complete final splits."""
    if out_dir is None:
        return
    keep = set()
    if at is not None:
        points = [budget_dir(out_dir, b) for b in cfg.eval.budgets or () if b <= at]
        keep = {f for p in points for f in [p, *(split_dir(p, s) for s in cfg.eval.splits)]}
        if at >= total:
            keep |= {split_dir(out_dir, s) for s in cfg.eval.splits}
    for pattern in (f"{out_dir.name}@*", f"{out_dir.name}.b*"):
        for stale in out_dir.parent.glob(pattern):
            if stale not in keep or not (stale / "summary.json").is_file():
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()


class FitClock:
    """The fit's seconds and decoded tokens so far (scoring of learning-curve points excluded), across the
    attempts of a resumed fit: after every optimizer step the reading is appended to ``clock.jsonl`` in the
    training folder, and a resumed attempt starts from the reading at its checkpoint's step."""

    FILE = "clock.jsonl"

    def __init__(self, train_dir: Path | None, resume_at: int | None):
        self.path = train_dir / self.FILE if train_dir is not None else None
        fit_seconds, tokens = 0.0, 0
        if resume_at is not None:
            fit_seconds, tokens = self.reading(train_dir, resume_at)
            lines = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_at]
            files.write_text(self.path, "".join(f"{line}\n" for line in lines))
        elif self.path is not None and self.path.exists():
            self.path.unlink()
        self.start, self.tokens = time.perf_counter() - fit_seconds, tokens_generated() - tokens

    @classmethod
    def reading(cls, train_dir: Path, step: int) -> tuple[float, int] | None:
        """The (fit seconds, tokens) reading at ``step`` on file in ``train_dir``, or None."""
        path, found = train_dir / cls.FILE, None
        for line in path.read_text().splitlines() if path.is_file() else ():
            entry = json.loads(line)
            if entry["step"] == step:
                found = entry["fit_seconds"], entry["train_tokens"]
        return found

    def read(self, now: float, scoring: float, scored_tokens: int) -> tuple[float, int]:
        """(fit seconds, tokens) at ``now``, less this attempt's scoring and its tokens."""
        return now - self.start - scoring, tokens_generated() - self.tokens - scored_tokens

    def tick(self, step: int, scoring: float, scored_tokens: int) -> None:
        """Records the reading after optimizer step ``step``."""
        if self.path is None:
            return
        fit_seconds, tokens = self.read(time.perf_counter(), scoring, scored_tokens)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "fit_seconds": fit_seconds, "train_tokens": tokens}) + "\n")


def budget_file(steps: int, fit_seconds: float, train_tokens: int = 0, trainable_params: int = 0) -> dict[str, str]:
    """``budget.json`` of a results folder: what its predictor cost: the optimizer steps it was trained for,
    the seconds of fitting and the tokens the fit decoded (rollouts, sampled answers, proposals; the
    scoring of earlier learning-curve points excluded) to get there, and the parameters the fit trained."""
    return {"budget.json": json.dumps({"steps": steps, "fit_seconds": fit_seconds, "train_tokens": train_tokens,
                                       "trainable_params": trainable_params})}


def fit_method(cfg: RunConfig, train_dir: Path | None = None, model=None, prepare=None,
               task: Task | None = None) -> tuple[Predictor, Task]:
    """Fits ``cfg.method`` on its task's train split (methods that train keep their logs in ``train_dir``);
    returns ``(predictor, task)``. ``model`` = ``(model, tokenizer)`` already loaded is used by methods that
    do not train (they leave the weights as they are); the others load their own copy. ``prepare(method)``
    is called before the fit (e.g. to hook learning-curve budgets). ``task``: a task object to fit on
    instead of the config's ``data.task`` (one built in Python)."""
    method_cls = get_method(cfg.method)
    task = task if task is not None else get_task(cfg.data.task, cfg.data.data_dir)
    train, val = [], []
    if method_cls.needs_training:
        train, val = train_val_split(task.load("train"), cfg.data.train_limit, cfg.data.val_size, cfg.data.seed)
    seed_everything(cfg.seed)
    if model is None or method_cls.needs_training:
        model = load_model(cfg.model.name, cfg.model.dtype, cfg.model.device)
    method = method_cls(*model, cfg, run_dir=train_dir if method_cls.needs_training else None)
    if prepare is not None:
        prepare(method)
    return method.fit(task, train, val), task


def own_train_dir(train_dir: Path) -> locks.Lock:
    """Owns the training folder of a results folder still to be made (refused while another live process
    owns it). What it holds was left by an earlier attempt (the results folder never appeared): the caller
    resumes from it or starts over (:func:`eval_method`)."""
    files.make_dirs(train_dir)
    return locks.hold(train_dir / RUN_LOCK, f"training folder {train_dir}")


def wipe_train_dir(train_dir: Path) -> None:
    """Empties a training folder this process owns (its lock stays)."""
    for entry in train_dir.iterdir():
        if entry.name != RUN_LOCK:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


@contextmanager
def run_folder(cfg: RunConfig, run_dir: Path, resume: bool = False) -> Iterator[None]:
    """Owns the training run folder ``run_dir`` for the block (the main process, under several).

    A new folder appears at once holding ``config.yaml`` and the lock; an existing non-empty one is
    refused. ``resume``: the folder's lock is taken over (refused while its owner lives) and its config
    saved again with this command's overrides. Every process gets the main process's error.
    """
    from accelerate.utils import broadcast_object_list

    state = process_state(cfg.model.device)
    lock, error, failure = None, "", None
    if state.is_main_process:
        try:
            lock = _take_run_folder(cfg, run_dir) if resume else _create_run_folder(cfg, run_dir)
        except MetatunerError as e:
            error, failure = str(e), e
    if state.num_processes > 1:
        error = broadcast_object_list([error])[0]
    if error:
        raise failure or MetatunerError(error)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _create_run_folder(cfg: RunConfig, run_dir: Path) -> locks.Lock:
    if files.is_nonempty_dir(run_dir):
        raise RunFolderExists(run_dir)
    lock = None
    try:
        with files.new_folder(run_dir) as tmp:
            files.write_new(tmp / "config.yaml", config_text(cfg))
            lock = locks.hold(tmp / RUN_LOCK, f"run folder {run_dir}")
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    lock.moved(run_dir / RUN_LOCK)
    return lock


def _take_run_folder(cfg: RunConfig, run_dir: Path) -> locks.Lock:
    lock = locks.hold(run_dir / RUN_LOCK, f"run folder {run_dir}")
    try:
        if (run_dir / "config.yaml").read_text() != config_text(cfg):
            save_config(cfg, run_dir / "config.yaml")
    except BaseException:
        lock.release()
        raise
    return lock


# ---- MetaTuner ---------------------------------------------------------------------------------
def train_metatuner(cfg: RunConfig, run_dir: Path, resume: bool = False, progress: bool = True,
                    task: Task | None = None):
    """Warm-up and joint training into the run folder ``run_dir`` (see :func:`run_folder`); returns the
    trained MetaTuner and the task (``task``, else the config's ``data.task``)."""
    from metatuner.training.trainer import Trainer

    task = task if task is not None else get_task(cfg.data.task, cfg.data.data_dir)
    train, val = train_val_split(task.load("train"), cfg.data.train_limit, cfg.data.val_size, cfg.data.seed)
    seed_everything(cfg.seed)
    model, tok = load_model(cfg.model.name, cfg.model.dtype, cfg.model.device)
    mt = build_metatuner(cfg, model, tok)
    Trainer(cfg, mt, task, train, val, run_dir, progress=progress).run(resume=resume)
    return mt, task


def load_run(run_dir: str | Path, overrides: list[str] = (), values: dict | None = None):
    """Rebuilds a trained MetaTuner from a run folder: its config (plus ``values``, a nested dict, and the
    ``key=value`` overrides) and newest checkpoint."""
    from metatuner.config import load_config
    from metatuner.training.checkpoint import latest_checkpoint, read_trainable

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise MetatunerError(f"{run_dir} is not a training run folder (no config.yaml)")
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise MetatunerError(f"{run_dir} has no checkpoint yet")
    cfg = load_config(run_dir / "config.yaml", list(overrides), values=values)
    tensors, state = read_trainable(ckpt)
    if not any(k.startswith(("enc.", "dec_frozen.", "hypernet.")) for k in tensors):
        raise MetatunerError(f"{ckpt} is not a MetaTuner checkpoint (it holds {', '.join(sorted(tensors)[:2])}, ...: "
                             f"a stopped {cfg.method} fit); only MetaTuner runs load and resume, the baselines fit "
                             "from the start")
    model, tok = load_model(cfg.model.name, cfg.model.dtype, cfg.model.device)
    mt = build_metatuner(cfg, model, tok)
    if state["extra"].get("has_static"):
        mt.add_static_adapter(cfg.train.static_rank, cfg.train.static_alpha)
    mt.load_trainable_state(tensors)
    mt.serve_generated = state["extra"].get("serve_generated", True)  # the validation gate's verdict
    branch = state["extra"].get("prompt_branch") or {}
    if branch.get("retired"):  # the prompt branch retired itself: p~ is served, and G is never run
        from metatuner.training.branch import PromptBranch

        mt.retire_prompt_branch(PromptBranch(retired=branch["retired"]).message())
    return mt, cfg


def run_predictor(run_dir: str | Path, overrides: list[str] = ()) -> tuple[Predictor, Task, RunConfig]:
    """A trained run's MetaTuner as a predictor, with its task and config (plus overrides)."""
    from metatuner.training.predictor import MetaTunerPredictor

    mt, cfg = load_run(run_dir, overrides)
    return MetaTunerPredictor(mt), get_task(cfg.data.task, cfg.data.data_dir), cfg


def named_predictors(run_dir: str | Path | None, methods: list[str], cfg: RunConfig | None,
                     overrides: list[str] = ()) -> tuple[dict[str, tuple[Predictor, Task]], RunConfig]:
    """Predictors by the name they answer to: a trained run's MetaTuner as ``metatuner``, and each method of
    ``methods`` by its name, fitted on the run's config (plus overrides), else on ``cfg``. Methods that do not
    train answer with the run's base model itself (no adapter is active outside MetaTuner's batches)."""
    found: dict[str, tuple[Predictor, Task]] = {}
    model = None
    if run_dir is not None:
        predictor, task, cfg = run_predictor(run_dir, overrides)
        found["metatuner"] = (predictor, task)
        model = (predictor.mt.actor, predictor.mt.tokenizer)
    for name in methods:
        if name in found:
            raise MetatunerError(f"method {name!r} is named twice")
        found[name] = fit_method(dataclasses.replace(cfg, method=name), model=model)
        if model is None and not get_method(name).needs_training:
            model = (found[name][0].model, found[name][0].tokenizer)
    if not found:
        raise MetatunerError("nothing to answer with: give a trained run folder and/or a method name",
                             cli="nothing to answer with: give --run DIR (a trained run) and/or --method NAME")
    return found, cfg


def eval_run(run_dir: str | Path, overrides: list[str], out_dir: Path | None) -> list[EvalResult]:
    """Scores a trained MetaTuner run on its task's test splits (``eval.splits``)."""
    predictor, task, cfg = run_predictor(run_dir, overrides)
    return eval_splits(predictor, task, cfg, out_dir)


def main_job(cfg: RunConfig, run_dir: Path) -> tuple[list[EvalResult], list[EvalResult]]:
    """Train MetaTuner, then score it and zero-shot on the same test items of every split of
    ``eval.splits``; returns (metatuner's results, zero-shot's results), one per split."""
    from metatuner.evaluation.predictors import LMPredictor
    from metatuner.training.predictor import MetaTunerPredictor

    with run_folder(cfg, run_dir):
        mt, task = train_metatuner(cfg, run_dir)
        tuned = eval_splits(MetaTunerPredictor(mt), task, cfg, run_dir / "eval-metatuner")
        base = LMPredictor(mt.actor, mt.tokenizer, None, name="zero-shot")  # p~, and no adapter is active
        return tuned, eval_splits(base, task, cfg, run_dir / "eval-zero-shot")
