"""A trained MetaTuner as a predictor: a generated prompt and generated LoRA weights per query."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from metatuner.evaluation.predictors import LMPredictor
from metatuner.models.metatuner import Factors, MetaTuner
from metatuner.tasks.base import Example, Task


class MetaTunerPredictor(LMPredictor):
    """Greedy prompt from G, LoRA from F, answer from M. Prompts and factors are computed once per batch."""

    def __init__(self, mt: MetaTuner, name: str = "metatuner"):
        super().__init__(mt.actor, mt.tokenizer, None, name=name)
        self.mt = mt
        self._memo: tuple[tuple[str, ...], list[str], Factors | None] | None = None

    @torch.no_grad()
    def _plan(self, task: Task, examples: list[Example]) -> tuple[list[str], Factors | None]:
        ids = tuple(ex.id for ex in examples)
        if self._memo is None or self._memo[0] != ids:
            prompts = self.mt.generate_prompts(task, examples)
            factors = self.mt.factors(self.mt.encode(task, examples)) if self.mt.use_hypernet else None
            self._memo = (ids, prompts, factors)
        return self._memo[1], self._memo[2]

    def instructions(self, task: Task, examples: list[Example]) -> list[str]:
        return self._plan(task, examples)[0]

    @contextlib.contextmanager
    def weights(self, task: Task, examples: list[Example]) -> Iterator[None]:
        with self.mt.as_actor(self._plan(task, examples)[1]):
            yield

    def describe(self) -> dict[str, Any]:
        return {"predictor": type(self).__name__, "method": self.name, "k": self.mt.k,
                "use_hypernet": self.mt.use_hypernet, "use_prompt": self.mt.use_prompt,
                "has_static": self.mt.has_static}
