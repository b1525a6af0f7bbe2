"""OPRO (Yang et al., 2023): an optimizer LM proposes instructions from a meta-prompt of scored ones.

Search: score the initial instruction ``p~`` on a seeded subset of training queries; then for each of
``rounds`` rounds, build the meta-prompt (the ``history`` best instructions so far with scores 0-100 in
ascending order, plus ``shown_examples`` queries from the subset with their gold answers), sample
``proposals_per_round`` instructions from the optimizer LM, clean them, score each new one by the
task's primary metric with the task model, and add it to the history. The best-scoring instruction
wins; ``p~`` is scored first and ties keep the earlier one, so OPRO never returns an instruction that
scores below ``p~`` on the scoring subset.

The optimizer LM is anything with ``propose(meta_prompt, n) -> list[str]``; by default
:class:`LMProposer` on the task model itself (or on ``opro.optimizer`` when set).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from metatuner import files
from metatuner.errors import MetatunerError
from metatuner.evaluation.generation import generate, render_chat
from metatuner.evaluation.harness import evaluate
from metatuner.evaluation.predictors import LMPredictor, Predictor
from metatuner.methods.base import METHODS, Method
from metatuner.options import ConfigKeyError, _at_least, option
from metatuner.prompts import opro_meta_prompt
from metatuner.tasks.base import Example, Task


@dataclass
class OPROConfig:
    """OPRO's search budget and its optimizer LM."""

    rounds: int = option(5, "optimization rounds; each samples proposals_per_round instructions (0: p~ alone)")
    proposals_per_round: int = option(4, "instructions sampled from the optimizer LM per round")
    score_size: int = option(32, "training queries every instruction is scored on (seeded subset)")
    temperature: float = option(1.0, "sampling temperature of the optimizer LM")
    max_new_tokens: int = option(64, "cap on the length of a proposed instruction")
    history: int = option(20, "best earlier instructions (with scores) shown in the meta-prompt")
    shown_examples: int = option(3, "training queries with gold answers shown in the meta-prompt (0: none)")
    optimizer: str | None = option(None, "optimizer LM (alias, hub id or folder); unset: the task model itself")

    def __post_init__(self):
        for name in ("proposals_per_round", "score_size", "max_new_tokens", "history"):
            _at_least(f"opro.{name}", getattr(self, name), 1)
        for name in ("rounds", "shown_examples"):
            _at_least(f"opro.{name}", getattr(self, name), 0)
        if self.temperature <= 0:
            raise ConfigKeyError("opro.temperature", f"opro.temperature must be > 0, got {self.temperature}")


class Proposer(Protocol):
    def propose(self, meta_prompt: str, n: int) -> list[str]:
        """``n`` raw completions of the meta-prompt."""


class LMProposer:
    """A local causal LM as OPRO's optimizer: the meta-prompt as one user turn, ``n`` samples."""

    def __init__(self, model, tokenizer, temperature: float = 1.0, max_new_tokens: int = 64):
        self.model, self.tokenizer = model, tokenizer
        self.temperature, self.max_new_tokens = temperature, max_new_tokens

    def propose(self, meta_prompt: str, n: int) -> list[str]:
        text = render_chat(self.tokenizer, [{"role": "user", "content": meta_prompt}])
        gens = generate(self.model, self.tokenizer, [text] * n, self.max_new_tokens,
                        do_sample=True, temperature=self.temperature)
        return [g.text for g in gens]


_BRACKETED = re.compile(r"\[(.*?)\]", re.S)


def clean_instruction(text: str) -> str:
    """OPRO's post-processing of a proposal: the text in the first square brackets when there are any
    (the meta-prompt asks for them), without ``<INS>`` tags, markdown bold, or surrounding quotes and
    brackets, on one line, first letter capitalised. Returns "" when nothing is left."""
    match = _BRACKETED.search(text)
    if match:
        text = match.group(1)
    text = text.replace("<INS>", "").replace("</INS>", "").replace("**", "")
    text = " ".join(text.split()).strip(" \"'`[]“”‘’")
    return text[:1].upper() + text[1:]


def score_predictor(predictor: Predictor, task: Task, examples: list[Example], config: Any = None) -> float:
    """The task's primary metric of ``predictor`` on ``examples``, through the evaluation harness."""
    ev = getattr(config, "eval", None)
    result = evaluate(predictor, task, examples, batch_size=ev.batch_size if ev else 16,
                      max_new_tokens=ev.max_new_tokens if ev else None, likelihood=False, progress=False)
    return result.score


def optimize_instruction(
    initial: str, score: Callable[[str], float], proposer: Proposer, shown: list[Example], cfg: OPROConfig,
    seed: int = 0,
) -> list[tuple[str, float]]:
    """Runs OPRO's search from ``initial``; returns the history ``[(instruction, score), ...]``, ``initial`` first.

    ``score`` maps an instruction to its score on the scoring subset; ``shown`` is where the meta-prompt's
    example queries are drawn from (a fresh seeded draw each round, as in OPRO).
    """
    rng = random.Random(seed)
    history = [(initial, score(initial))]
    for _ in range(cfg.rounds):
        best = sorted(history, key=lambda h: h[1])[-cfg.history:]  # stable: ascending, ties in history order
        examples = rng.sample(shown, min(cfg.shown_examples, len(shown)))
        prompt = opro_meta_prompt([(i, round(100 * s)) for i, s in best], [(ex.query, ex.answer) for ex in examples])
        seen = {i for i, _ in history}
        for raw in proposer.propose(prompt, cfg.proposals_per_round):
            instruction = clean_instruction(raw)
            if instruction and instruction not in seen:
                seen.add(instruction)
                history.append((instruction, score(instruction)))
    return history


def best_of(history: list[tuple[str, float]]) -> tuple[str, float]:
    """The highest-scoring entry; on ties the earliest (so ``p~`` wins ties)."""
    return max(history, key=lambda h: h[1])


def opro_config(config: Any) -> OPROConfig:
    return getattr(config, "opro", None) or OPROConfig()


def default_proposer(config: Any, model, tokenizer) -> LMProposer:
    """:class:`LMProposer` on ``opro.optimizer`` when set, else on the task model."""
    cfg = opro_config(config)
    if cfg.optimizer is not None:
        from metatuner.models.loading import load_model

        mc = getattr(config, "model", None)
        model, tokenizer = load_model(cfg.optimizer, mc.dtype if mc else "float32", mc.device if mc else "auto")
    return LMProposer(model, tokenizer, cfg.temperature, cfg.max_new_tokens)


class OPROPredictor(LMPredictor):
    """The task model with OPRO's best instruction; ``describe()`` also lists every instruction tried."""

    def __init__(self, model, tokenizer, instruction: str, history: list[tuple[str, float]], name: str = "opro"):
        super().__init__(model, tokenizer, instruction, name=name)
        self.history = history

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"history": [{"instruction": i, "score": s} for i, s in self.history]}


@METHODS.register("opro")
class OPRO(Method):
    """OPRO instruction search on a training subset; the predictor answers with the best instruction."""

    needs_training = True
    config_class = OPROConfig

    def __init__(self, model, tokenizer, config: Any = None, run_dir=None, proposer: Proposer | None = None):
        super().__init__(model, tokenizer, config, run_dir)
        self.proposer = proposer
        self.history: list[tuple[str, float]] = []

    def fit(self, task: Task, train: list[Example], val: list[Example]) -> OPROPredictor:
        if not train:
            raise MetatunerError(f"opro needs training items of task {task.name!r} to score instructions on")
        cfg = self.method_config
        seed = getattr(self.config, "seed", 0)
        subset = random.Random(seed).sample(list(train), min(cfg.score_size, len(train)))
        proposer = self.proposer or default_proposer(self.config, self.model, self.tokenizer)

        def score(instruction: str) -> float:
            return score_predictor(LMPredictor(self.model, self.tokenizer, instruction), task, subset, self.config)

        self.history = optimize_instruction(task.instruction, score, proposer, subset, cfg, seed)
        best, _ = best_of(self.history)
        if self.run_dir is not None:
            rows = [{"instruction": i, "score": s} for i, s in self.history]
            files.write_text(self.run_dir / "opro.json", json.dumps(rows, indent=2, ensure_ascii=False))
        return OPROPredictor(self.model, self.tokenizer, best, self.history)
