"""Trained LoRA as predictors: a trained MetaTuner (a generated prompt and generated LoRA weights per query),
and a static LoRA on M (the SFT baseline: p~ and the one fine-tuned LoRA for every query)."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Any, Iterator

import torch

from metatuner.evaluation.predictors import LMPredictor
from metatuner.models.metatuner import Factors, MetaTuner
from metatuner.models.static import StaticLoRA
from metatuner.tasks.base import Example, Task


class MetaTunerPredictor(LMPredictor):
    """Greedy prompt from G, LoRA from F, answer from M. Prompts and factors are computed once per batch.

    ``prompts``: ``"generated"`` or ``"initial"`` (p~) forces one; unset follows the validation gate's
    verdict stored with the run (``mt.serve_generated``). ``trace`` keeps, per query id, G's cleaned
    output and whether it was cut at the token cap (for the diagnostics), for the newest ``trace_limit``
    queries only, so a predictor that serves requests for days holds a bounded amount of memory.
    """

    def __init__(self, mt: MetaTuner, name: str = "metatuner", prompts: str | None = None, trace_limit: int = 256):
        super().__init__(mt.actor, mt.tokenizer, None, name=name)
        self.mt = mt
        self.prompts = prompts
        self.trace: OrderedDict[str, tuple[str, bool]] = OrderedDict()
        self.trace_limit = trace_limit
        self._memo: tuple[tuple[str, ...], list[str], Factors | None] | None = None

    def uses_generated_prompts(self) -> bool:
        if not self.mt.use_prompt:
            return False
        return self.mt.serve_generated if self.prompts is None else self.prompts == "generated"

    @torch.no_grad()
    def _plan(self, task: Task, examples: list[Example]) -> tuple[list[str], Factors | None]:
        ids = tuple(ex.id for ex in examples)
        if self._memo is None or self._memo[0] != ids:
            prompts = [task.instruction_for(ex) for ex in examples]
            if self.uses_generated_prompts():
                gens = self.mt.generate_outputs(task, examples)
                outputs = [self.mt.clean_output(g) for g in gens]
                for ex, o, g in zip(examples, outputs, gens):
                    self.trace[ex.id] = (o, not g.finished)
                    self.trace.move_to_end(ex.id)
                while len(self.trace) > self.trace_limit:
                    self.trace.popitem(last=False)
                prompts = [self.mt.compose(task, ex, o) for ex, o in zip(examples, outputs)]
            factors = self.mt.factors(self.mt.encode(task, examples)) if self.mt.use_hypernet else None
            self._memo = (ids, prompts, factors)
        return self._memo[1], self._memo[2]

    def instructions(self, task: Task, examples: list[Example]) -> list[str]:
        return self._plan(task, examples)[0]

    def row_factors(self, task: Task, examples: list[Example]) -> Factors | None:
        return self._plan(task, examples)[1]

    @contextlib.contextmanager
    def weights_with(self, factors: Factors | None) -> Iterator[None]:
        with self.mt.as_actor(factors):
            yield

    def describe(self) -> dict[str, Any]:
        return {"predictor": type(self).__name__, "method": self.name, "k": self.mt.k,
                "use_hypernet": self.mt.use_hypernet, "use_prompt": self.mt.use_prompt,
                "has_static": self.mt.has_static, "mode": self.mt.gen_cfg.mode,
                "prompts": "generated" if self.uses_generated_prompts() else "initial"} | (
                {"prompt_branch": self.mt.prompt_branch_note} if self.mt.prompt_branch_note else {})


class StaticLoRAPredictor(LMPredictor):
    """M with its fine-tuned static LoRA on, answering every query under p~ (the SFT baseline)."""

    def __init__(self, static: StaticLoRA, name: str = "sft"):
        super().__init__(static.model, static.tokenizer, None, name=name)
        self.static = static

    @contextlib.contextmanager
    def weights_with(self, factors: Factors | None) -> Iterator[None]:
        with self.static.active():
            yield

    def describe(self) -> dict[str, Any]:
        return {"predictor": type(self).__name__, "method": self.name, "has_static": self.static.has_adapter,
                "prompts": "initial"}
