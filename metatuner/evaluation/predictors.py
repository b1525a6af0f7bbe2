"""Predictors: what the evaluation harness scores.

A predictor answers a batch of task examples. The interface is deliberately narrow so that a zero-shot
model, a LoRA-tuned model and MetaTuner (a generated prompt and generated weights per query) all fit:

- :meth:`Predictor.predict` returns, per example, the instruction it used, the exact model input and
  the output text;
- :meth:`Predictor.choice_logprobs` (optional) scores a multiple-choice task's options by likelihood.

:class:`LMPredictor` implements both on a Hugging Face causal LM. Subclasses change only *which
instruction* each query gets (:meth:`LMPredictor.instructions`) and *which weights* the model uses
for a batch (:meth:`LMPredictor.weights`), e.g. per-row generated LoRA.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from metatuner.evaluation.generation import continuation_logprobs, generate, render_chat
from metatuner.tasks.base import Example, Task


@dataclass
class Prediction:
    instruction: str
    rendered: str
    output: str
    new_tokens: int


class Predictor(ABC):
    #: whether :meth:`predict` takes ``on_text`` and hands over each row's text while it is decoded (a caller
    #: streaming answers sends a predictor without it each answer whole, when its batch is done)
    streams: bool = False

    @abstractmethod
    def predict(self, task: Task, examples: list[Example], max_new_tokens: int) -> list[Prediction]:
        """Answers one batch; the i-th prediction belongs to the i-th example."""

    def budget(self, task: Task) -> int:
        """How many new tokens an answer may take (the task's budget for its plain instruction)."""
        return task.max_new_tokens

    def choice_logprobs(self, task: Task, examples: list[Example]) -> list[list[float]] | None:
        """Per example, the mean log-probability of each option of ``task.choices``; None if unsupported."""
        return None

    def describe(self) -> dict[str, Any]:
        """What goes into the results summary to identify this predictor."""
        return {"predictor": type(self).__name__}


class LMPredictor(Predictor):
    """A causal LM answering with a fixed instruction (the zero-shot and CoT baselines as they are).

    ``demos`` (optional few-shot examples) go before the query as earlier exchanges: each demo is the
    task's user turn for its query followed by an assistant turn holding its ``target``.
    """

    streams = True

    def __init__(
        self, model, tokenizer, instruction: str | None = None, name: str = "zero-shot", cot: bool = False,
        demos: list[Example] | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.instruction = instruction
        self.name = name
        self.cot = cot
        self.demos = list(demos or [])

    def budget(self, task: Task) -> int:
        return task.cot_max_new_tokens if self.cot else task.max_new_tokens

    def instructions(self, task: Task, examples: list[Example]) -> list[str]:
        """The instruction for each query (default: the fixed one, else the task's initial prompt)."""
        return [self.instruction or task.instruction_for(ex) for ex in examples]

    @contextlib.contextmanager
    def weights(self, task: Task, examples: list[Example]) -> Iterator[None]:
        """Context in which the model carries the weights for this batch (default: as loaded)."""
        yield

    def messages(self, task: Task, instruction: str, example: Example) -> list[dict[str, str]]:
        """The task's chat messages for one query, with the demos inserted just before the query turn."""
        messages = task.messages(instruction, example)
        shots = [
            turn for d in self.demos
            for turn in (task.messages(instruction, d)[-1], {"role": "assistant", "content": d.target})
        ]
        return messages[:-1] + shots + messages[-1:]

    def _inputs(self, task: Task, examples: list[Example]) -> tuple[list[str], list[str]]:
        instructions = self.instructions(task, examples)
        rendered = [render_chat(self.tokenizer, self.messages(task, i, ex)) for i, ex in zip(instructions, examples)]
        return instructions, rendered

    def predict(self, task: Task, examples: list[Example], max_new_tokens: int,
                on_text: Callable[[int, str], None] | None = None) -> list[Prediction]:
        """Answers one batch with one batched generate.

        Args:
            task: gives each query's messages, p~ and stop strings.
            examples: the queries of the batch.
            max_new_tokens: the token budget of every answer.
            on_text: if given, ``on_text(i, piece)`` is called while the batch decodes with the next piece of the
                i-th answer; the pieces of an answer join to exactly its ``output``.

        Returns:
            One :class:`Prediction` per example, in order.
        """
        instructions, rendered = self._inputs(task, examples)
        with self.weights(task, examples):
            gens = generate(self.model, self.tokenizer, rendered, max_new_tokens, task.stop, on_text=on_text)
        return [Prediction(i, r, g.text, g.new_tokens) for i, r, g in zip(instructions, rendered, gens)]

    def choice_logprobs(self, task: Task, examples: list[Example]) -> list[list[float]] | None:
        options = [task.choices(ex) for ex in examples]
        if any(o is None for o in options):
            return None
        _, rendered = self._inputs(task, examples)
        # one row per (example, option); each example's rows must see that example's weights,
        # so the batch is scored option by option, keeping the example order
        scores = [[0.0] * len(o) for o in options]
        with self.weights(task, examples):
            for k in range(max(map(len, options))):
                lp = continuation_logprobs(self.model, self.tokenizer, rendered, [o[k] for o in options])
                for i, v in enumerate(lp):
                    scores[i][k] = v
        return scores

    def describe(self) -> dict[str, Any]:
        return {
            "predictor": type(self).__name__,
            "method": self.name,
            "model": getattr(self.model.config, "_name_or_path", None),
            "instruction": self.instruction,
        } | ({"demos": [d.id for d in self.demos]} if self.demos else {})
