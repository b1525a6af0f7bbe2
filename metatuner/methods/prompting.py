"""The prompting baselines: the task's initial prompt (zero-shot) and its chain-of-thought variant."""

from __future__ import annotations

from metatuner.evaluation.predictors import LMPredictor
from metatuner.methods.base import METHODS, Method
from metatuner.tasks.base import Example, Task


@METHODS.register("zero-shot")
class ZeroShot(Method):
    """The base model answering with the task's initial instruction ``p~``."""

    def fit(self, task: Task, train: list[Example], val: list[Example]) -> LMPredictor:
        return LMPredictor(self.model, self.tokenizer, None, name="zero-shot")  # each query's own p~


@METHODS.register("cot")
class ChainOfThought(Method):
    """The base model answering with the task's chain-of-thought instruction."""

    def fit(self, task: Task, train: list[Example], val: list[Example]) -> LMPredictor:
        return LMPredictor(self.model, self.tokenizer, task.cot_instruction, name="cot", cot=True)
