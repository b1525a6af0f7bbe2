"""Recipes: the end-to-end jobs behind the CLI commands, as plain functions.

Each recipe resolves its inputs (task, splits, model, method), runs, and writes a run folder holding
the resolved config and the results. The CLI only parses arguments and calls these.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch

from metatuner.config import RunConfig, save_config, to_dict
from metatuner.errors import MetatunerError
from metatuner.evaluation.harness import EvalResult, evaluate, select
from metatuner.methods import get_method
from metatuner.models.loading import load_model
from metatuner.tasks import Example, get_task


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


def eval_method(cfg: RunConfig, out_dir: Path | None) -> EvalResult:
    """Fits ``cfg.method`` (zero-shot, cot, ...) and scores it on the configured test subset."""
    method_cls = get_method(cfg.method)
    task = get_task(cfg.data.task, cfg.data.data_dir)
    test = select(task.load("test"), cfg.eval.limit, cfg.eval.subset, cfg.eval.seed)
    train, val = [], []
    if getattr(method_cls, "needs_training", False):
        train, val = train_val_split(task.load("train"), cfg.data.train_limit, cfg.data.val_size, cfg.data.seed)
    seed_everything(cfg.seed)
    model, tok = load_model(cfg.model.name, cfg.model.dtype, cfg.model.device)
    predictor = method_cls(model, tok, cfg).fit(task, train, val)
    result = evaluate(
        predictor,
        task,
        test,
        batch_size=cfg.eval.batch_size,
        max_new_tokens=cfg.eval.max_new_tokens,
        likelihood=cfg.eval.likelihood,
        out_dir=out_dir,
        config=to_dict(cfg),
    )
    if out_dir is not None:
        save_config(cfg, out_dir / "config.yaml")
    return result
