"""Predictors: what the evaluation harness scores.

A predictor answers a batch of task examples. The interface is deliberately narrow so that a zero-shot
model, a LoRA-tuned model and MetaTuner (a generated prompt and generated weights per query) all fit:

- :meth:`Predictor.predict` returns, per example, the instruction it used, the exact model input and
  the output text;
- :meth:`Predictor.choice_logprobs` (optional) scores a multiple-choice task's options by likelihood;
- :meth:`Predictor.start` (optional) gives a :class:`Decoding`: a running batch that queries join and leave
  between decode steps (iteration-level batching, for the serving engine), answering each query exactly as
  :meth:`Predictor.predict` answers it alone. A predictor without it is served whole batches at a time.

:class:`LMPredictor` implements all three on a Hugging Face causal LM. Subclasses change only *which
instruction* each query gets (:meth:`LMPredictor.instructions`) and *which weights* the model uses: per-row
LoRA factors for a batch of queries (:meth:`LMPredictor.row_factors`, e.g. MetaTuner's generated LoRA) and
the context that puts them and any static adapter on the model (:meth:`LMPredictor.weights_with`). A
subclass that overrides :meth:`LMPredictor.weights` itself is answered whole batches at a time.
"""

from __future__ import annotations

import contextlib
import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from metatuner.evaluation import decoding
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

    def start(self, task: Task) -> Decoding | None:
        """An empty running batch for ``task`` (iteration-level decoding), or None: this predictor answers whole
        batches only, with :meth:`predict`."""
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

    def row_factors(self, task: Task, examples: list[Example]) -> decoding.Factors | None:
        """Per-row LoRA factors for these queries (``site -> (A [bs, r, in], B [bs, out, r])``); default: none."""
        return None

    @contextlib.contextmanager
    def weights_with(self, factors: decoding.Factors | None) -> Iterator[None]:
        """Context in which the model carries the weights for rows with these per-row ``factors`` (default: the
        model as loaded)."""
        yield

    @contextlib.contextmanager
    def weights(self, task: Task, examples: list[Example]) -> Iterator[None]:
        """Context in which the model carries the weights for this batch."""
        with self.weights_with(self.row_factors(task, examples)):
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

    def start(self, task: Task) -> Decoding | None:
        """A :class:`Decoding` on this predictor's model, unless a subclass overrides :meth:`weights` (weights that
        depend on the whole batch) or the model is one :func:`~metatuner.evaluation.decoding.supports` rejects."""
        if type(self).weights is not LMPredictor.weights or not decoding.supports(self.model):
            return None
        return Decoding(self, task)

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


class Decoding:
    """An :class:`LMPredictor`'s running batch for one task: :meth:`admit` adds queries, each :meth:`step` decodes
    one token of every query in it and returns those that ended, which leave at once. Each query's
    :class:`Prediction` equals the one ``predictor.predict(task, [example], budget)`` gives (greedy, token for
    token), whoever shares its steps: its instruction and per-row factors come from the same predictor methods
    (:meth:`LMPredictor.instructions`, :meth:`LMPredictor.row_factors`), and
    :class:`~metatuner.evaluation.decoding.RunningBatch` decodes it as ``generate`` does.
    """

    def __init__(self, predictor: LMPredictor, task: Task):
        self.predictor, self.task = predictor, task
        self.batch = decoding.RunningBatch(predictor.model, predictor.tokenizer, task.stop, predictor.weights_with)
        self._inputs: dict[int, tuple[Example, str, str]] = {}  # row key -> (example, instruction, model input)
        self._keys = itertools.count()

    def __len__(self) -> int:
        return len(self.batch)

    def admit(self, examples: list[Example], budgets: list[int],
              on_text: list[Callable[[str], None] | None] | None = None) -> None:
        """Adds queries with their token budgets; ``on_text[i]``, if given, receives the i-th answer in pieces that
        join to its ``output``."""
        instructions, rendered = self.predictor._inputs(self.task, examples)
        factors = self.predictor.row_factors(self.task, examples)
        keys = [next(self._keys) for _ in examples]
        self.batch.admit(keys, rendered, budgets, factors, on_text)
        self._inputs.update(zip(keys, zip(examples, instructions, rendered)))

    def step(self) -> list[tuple[Example, Prediction, float]]:
        """One decode step; the queries that ended, each with its prediction and the mean number of rows of the
        steps that decoded it."""
        answered = []
        for row in self.batch.step():
            example, instruction, rendered = self._inputs.pop(row.key)
            g = row.generation
            answered.append((example, Prediction(instruction, rendered, g.text, g.new_tokens), row.batch_size))
        return answered
