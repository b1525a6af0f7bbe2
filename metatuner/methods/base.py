"""The method interface and its registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

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

    @abstractmethod
    def fit(self, task: Task, train: list[Example], val: list[Example]) -> Predictor:
        """Returns the predictor this method produces for ``task``."""


METHODS: Registry[type[Method]] = Registry("method")


def get_method(name: str) -> type[Method]:
    return METHODS.get(name)
