"""Recipes: the end-to-end jobs behind the CLI commands, as plain functions.

Each recipe resolves its inputs (task, splits, model, method), runs, and writes a run folder holding
the resolved config and the results. The CLI only parses arguments and calls these.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from metatuner.config import RunConfig, save_config, to_dict
from metatuner.errors import MetatunerError
from metatuner.files import write_text_atomic
from metatuner.evaluation.harness import EvalResult, evaluate, select
from metatuner.evaluation.predictors import Predictor
from metatuner.methods import get_method
from metatuner.models.loading import load_model, process_state
from metatuner.tasks import Example, Task, get_task
from metatuner.training.build import build_metatuner  # noqa: F401 - re-exported: callers import it from here too


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
                   split: str | None = None) -> EvalResult:
    """Scores any predictor on the configured subset of one test split of ``task`` (default: the first of
    ``eval.splits``): the one evaluation path."""
    split = split or cfg.eval.splits[0]
    test = select(task.load(split), cfg.eval.limit, cfg.eval.subset, cfg.eval.seed)
    result = evaluate(
        predictor, task, test, batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
        likelihood=cfg.eval.likelihood, out_dir=out_dir, config=to_dict(cfg), progress=progress, split=split,
    )
    if out_dir is not None:
        save_config(cfg, out_dir / "config.yaml")
    return result


def eval_splits(predictor, task, cfg: RunConfig, out_dir: Path | None, progress: bool = True) -> list[EvalResult]:
    """Scores a predictor on every split of ``eval.splits`` (in that order): the first into ``out_dir``,
    each other into :func:`split_dir`. ``out_dir`` is written last, so its appearing means all are done."""
    first, *others = cfg.eval.splits
    results = {s: eval_predictor(predictor, task, cfg, split_dir(out_dir, s) if out_dir else None, progress, s) for s in others}
    results[first] = eval_predictor(predictor, task, cfg, out_dir, progress, first)
    return [results[s] for s in cfg.eval.splits]


def budget_dir(out_dir: Path, step: int) -> Path:
    """Where a learning curve's results at optimizer step ``step`` go: beside ``out_dir``, as ``<out_dir>.b<step>``."""
    return out_dir.with_name(f"{out_dir.name}.b{step}")


def eval_method(cfg: RunConfig, out_dir: Path | None) -> list[EvalResult]:
    """Fits ``cfg.method`` (zero-shot, cot, ...) once and scores it on every split of ``eval.splits``.

    With ``eval.budgets`` (a learning curve) a trained method is also scored at those optimizer steps of
    its fit, into :func:`budget_dir` folders, each with a ``budget.json`` of its step and the seconds of
    fitting spent until then (scoring excluded); ``budget.json`` beside ``out_dir`` gives the full budget.
    """
    task = get_task(cfg.data.task, cfg.data.data_dir)
    for split in cfg.eval.splits:
        task.load(split)  # fail on bad data or an unknown split before loading the model
    # a trained method's logs and checkpoints go beside the results folder, which appears only when complete
    train_dir = out_dir.with_name(out_dir.name + "-train") if out_dir is not None else None
    start, scoring, fitted = time.perf_counter(), [0.0], []

    def on_budget(step: int, predictor) -> None:
        began = time.perf_counter()
        folder = budget_dir(out_dir, step) if out_dir is not None else None
        results = eval_splits(predictor, task, cfg, folder, progress=False)
        if folder is not None:
            write_budget(folder, step, began - start - scoring[0])
        scoring[0] += time.perf_counter() - began
        print(f"    step {step}: " + "; ".join(r.line() for r in results), flush=True)

    def prepare(method) -> None:
        fitted.append(method)
        if cfg.eval.budgets:
            method.on_budget, method.budgets = on_budget, {b for b in cfg.eval.budgets if b < method.budget()}

    predictor, task = fit_method(cfg, train_dir, prepare=prepare)
    fit_seconds = time.perf_counter() - start - scoring[0]
    results = eval_splits(predictor, task, cfg, out_dir)
    if out_dir is not None:
        write_budget(out_dir, fitted[0].budget(), fit_seconds)
    return results


def write_budget(folder: Path, step: int, fit_seconds: float) -> None:
    """``budget.json``: the optimizer steps a results folder's predictor was trained for, and the seconds
    of fitting (scoring of earlier learning-curve points excluded) it took to get there."""
    write_text_atomic(folder / "budget.json", json.dumps({"steps": step, "fit_seconds": fit_seconds}))


def fit_method(cfg: RunConfig, train_dir: Path | None = None, model=None, prepare=None) -> tuple[Predictor, Task]:
    """Fits ``cfg.method`` on its task's train split (methods that train keep their logs in ``train_dir``);
    returns ``(predictor, task)``. ``model`` = ``(model, tokenizer)`` already loaded is used by methods that
    do not train (they leave the weights as they are); the others load their own copy. ``prepare(method)``
    is called before the fit (e.g. to hook learning-curve budgets)."""
    method_cls = get_method(cfg.method)
    task = get_task(cfg.data.task, cfg.data.data_dir)
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


# ---- MetaTuner ---------------------------------------------------------------------------------
def train_metatuner(cfg: RunConfig, run_dir: Path, resume: bool = False, progress: bool = True):
    """Warm-up and joint training into ``run_dir``; returns the trained MetaTuner and the task."""
    from metatuner.training.trainer import Trainer

    task = get_task(cfg.data.task, cfg.data.data_dir)
    train, val = train_val_split(task.load("train"), cfg.data.train_limit, cfg.data.val_size, cfg.data.seed)
    seed_everything(cfg.seed)
    model, tok = load_model(cfg.model.name, cfg.model.dtype, cfg.model.device)
    mt = build_metatuner(cfg, model, tok)
    if process_state(cfg.model.device).is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    Trainer(cfg, mt, task, train, val, run_dir, progress=progress).run(resume=resume)
    return mt, task


def load_run(run_dir: str | Path, overrides: list[str] = ()):
    """Rebuilds a trained MetaTuner from a run folder: its config (plus overrides) and newest checkpoint."""
    from metatuner.config import load_config
    from metatuner.training.checkpoint import latest_checkpoint, read_trainable

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise MetatunerError(f"{run_dir} is not a training run folder (no config.yaml)")
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise MetatunerError(f"{run_dir} has no checkpoint yet")
    cfg = load_config(run_dir / "config.yaml", list(overrides))
    model, tok = load_model(cfg.model.name, cfg.model.dtype, cfg.model.device)
    mt = build_metatuner(cfg, model, tok)
    tensors, state = read_trainable(ckpt)
    if state["extra"].get("has_static"):
        mt.add_static_adapter(cfg.train.static_rank, cfg.train.static_alpha)
    mt.load_trainable_state(tensors)
    mt.serve_generated = state["extra"].get("serve_generated", True)  # the validation gate's verdict
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
        raise MetatunerError("nothing to answer with: give --run DIR (a trained run) and/or --method NAME")
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

    mt, task = train_metatuner(cfg, run_dir)
    tuned = eval_splits(MetaTunerPredictor(mt), task, cfg, run_dir / "eval-metatuner")
    base = LMPredictor(mt.actor, mt.tokenizer, None, name="zero-shot")  # p~, and no adapter is active
    return tuned, eval_splits(base, task, cfg, run_dir / "eval-zero-shot")
