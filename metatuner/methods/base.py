"""The method interface and its registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable

from metatuner.evaluation.predictors import Predictor
from metatuner.registry import Registry
from metatuner.tasks.base import Example, Task


class Method(ABC):
    """Fits a predictor for a task. Methods without training ignore ``train`` and ``val``."""

    name: str
    #: whether ``fit`` needs training data (the recipes load the train split only then)
    needs_training: bool = False

    def __init__(self, model, tokenizer, config: Any = None, run_dir: Path | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.run_dir = run_dir  # where training logs and checkpoints go (None: nowhere)
        #: learning curves: called as ``on_budget(step, predictor)`` at each step of ``budgets`` during ``fit``
        self.on_budget: Callable[[int, Predictor], None] | None = None
        self.budgets: set[int] = set()
        #: the parameters ``fit`` trained (set by trained methods with :func:`count_trainable`), for results tables
        self.trainable_params: int = 0

    @abstractmethod
    def fit(self, task: Task, train: list[Example], val: list[Example]) -> Predictor:
        """Returns the predictor this method produces for ``task``."""

    def budget(self) -> int:
        """The optimizer steps ``fit`` takes in all (0 for methods that do not train)."""
        return 0

    def at_step(self, step: int, predictor: Callable[[], Predictor]) -> None:
        """Trained methods call this after each optimizer step (and with 0 before the first): at a step of
        ``budgets`` the predictor the method would return now is handed to ``on_budget``."""
        if self.on_budget is not None and step in self.budgets:
            self.on_budget(step, predictor())


def count_trainable(*modules) -> int:
    """The trainable parameters (``requires_grad``) of ``modules``, each tensor counted once."""
    seen = {id(p): p.numel() for m in modules for p in m.parameters() if p.requires_grad}
    return sum(seen.values())


METHODS: Registry[type[Method]] = Registry("method")


def get_method(name: str) -> type[Method]:
    return METHODS.get(name)
