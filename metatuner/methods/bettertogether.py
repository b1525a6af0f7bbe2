"""BetterTogether (Soylu, Potts and Khattab, 2024; DSPy): prompt optimization and fine-tuning in turns.

A *program* is (instruction, few-shot demos, static LoRA on M or none). The strategy string, default
``"p -> w -> p"``, lists the steps, each applied to the current program:

- ``p``, prompt optimization, by ``prompt_optimizer``:
  ``demos``: bootstrap (the program answers ``traces`` training queries; the ones it gets right become
  demos, with its own output as the answer; gold targets when none is right), then random search over
  the current demos and ``trials`` random subsets of ``demos`` bootstrapped ones, each scored on the
  scoring subset of train; the best is kept.
  ``opro``: OPRO's instruction search (:mod:`metatuner.methods.opro`, settings from ``opro.*``) with the
  program's demos and LoRA in place, scored on the same subset.
- ``w``, fine-tuning on the program's own correct traces: it answers ``traces`` training queries, and a
  fresh static LoRA on M is trained on (instruction, x) -> its own correct output with MetaTuner's
  warm-up SFT (on gold targets when none is correct, which is recorded). The LoRA is trained without
  demos, so the fine-tuned program answers without them (as DSPy's ``exclude_demos``).

The initial program and every step's program are scored on validation (``val``, or when it is empty a
seeded slice of train that is never fitted on) and the best is returned; the predictor's ``describe()``
records which (``chosen_step``, and ``chosen_kind``: ``initial``, ``p`` or ``w``). A step that raises ends the
strategy: its error is recorded and the best program so far is returned.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import torch

from metatuner import files
from metatuner.config import BetterTogetherConfig, RunConfig, parse_strategy
from metatuner.errors import MetatunerError
from metatuner.evaluation.harness import evaluate, select
from metatuner.evaluation.predictors import LMPredictor
from metatuner.methods.base import METHODS, Method
from metatuner.methods.opro import best_of, default_proposer, opro_config, optimize_instruction, score_predictor
from metatuner.tasks.base import Example, Task

logger = logging.getLogger(__name__)


@dataclass
class Program:
    instruction: str
    demos: list[Example] = field(default_factory=list)
    lora: dict[str, torch.Tensor] | None = None  # a snapshot of M's static LoRA (adapter_state("static"))

    def summary(self) -> dict[str, Any]:
        demos = [d.id for d in self.demos]
        return {"instruction": self.instruction, "demos": demos, "static_lora": self.lora is not None}


class ProgramPredictor(LMPredictor):
    """A program as a predictor: its instruction and demos, and its static LoRA active while it answers."""

    def __init__(self, model, tokenizer, program: Program, mt=None, name: str = "bettertogether",
                 details: dict[str, Any] | None = None):
        super().__init__(model, tokenizer, program.instruction, name=name, demos=program.demos)
        self.program, self.mt, self.details = program, mt, details or {}

    @contextlib.contextmanager
    def weights(self, task: Task, examples: list[Example]) -> Iterator[None]:
        if self.program.lora is None:
            yield
            return
        # programs share one static adapter slot on M, so each loads its own snapshot before answering
        with torch.no_grad():
            for k, v in self.mt.m_lora.adapter_state("static").items():
                v.copy_(self.program.lora[k])
        with self.mt.as_actor(None):
            yield

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"static_lora": self.program.lora is not None} | self.details


@METHODS.register("bettertogether")
class BetterTogether(Method):
    """Runs the strategy's steps on (instruction, demos, LoRA) and returns the best program on validation."""

    needs_training = True

    def __init__(self, model, tokenizer, config: Any = None, run_dir=None, proposer=None):
        super().__init__(model, tokenizer, config, run_dir)
        self.proposer = proposer  # OPRO's optimizer LM for prompt_optimizer=opro (default: the task model)
        self.history: list[dict[str, Any]] = []
        self.mt = None  # holds M's static LoRA, built at the first w step

    @property
    def cfg(self) -> BetterTogetherConfig:
        return getattr(self.config, "bettertogether", None) or BetterTogetherConfig()

    def fit(self, task: Task, train: list[Example], val: list[Example]) -> ProgramPredictor:
        cfg = self.cfg
        steps = parse_strategy(cfg.strategy)
        if not train:
            raise MetatunerError(f"bettertogether needs training items of task {task.name!r}")
        self.task, self.seed = task, getattr(self.config, "seed", 0)
        self.val_set, self.score_set, self.pool = self.split(train, val)
        program = best = Program(task.instruction)
        best_score, best_step = self.validate(program), 0
        self.history = [{"step": 0, "kind": "initial", **program.summary(), "val_score": best_score}]
        for i, kind in enumerate(steps, 1):
            record: dict[str, Any] = {"step": i, "kind": kind}
            self.history.append(record)
            try:
                program = {"p": self.prompt_step, "w": self.weight_step}[kind](program, i, record)
                record.update(program.summary(), val_score=self.validate(program))
            except Exception as e:  # noqa: BLE001 - KeyboardInterrupt is no Exception and still stops the fit
                record["error"] = f"{type(e).__name__}: {e}"
                logger.warning("bettertogether step %d (%s) failed; keeping the best program so far", i, kind,
                               exc_info=True)
                break
            if record["val_score"] > best_score:
                best, best_score, best_step = program, record["val_score"], i
        details = {"strategy": cfg.strategy, "chosen_step": best_step, "chosen_kind": self.history[best_step]["kind"],
                   "steps": self.history}
        if self.run_dir is not None:
            files.write_text(self.run_dir / "bettertogether.json", json.dumps(details, indent=2, ensure_ascii=False))
        return ProgramPredictor(self.model, self.tokenizer, best, self.mt, details=details)

    # ---- data ------------------------------------------------------------------------------------
    def split(self, train: list[Example], val: list[Example]) -> tuple[list[Example], ...]:
        """(validation, scoring subset, trace pool): a seeded shuffle of train; validation from ``val`` if any."""
        cfg, items = self.cfg, list(train)
        random.Random(self.seed).shuffle(items)
        if val:
            val_set = select(val, cfg.val_size, "random", self.seed)
        elif len(items) > cfg.val_size:
            val_set, items = items[: cfg.val_size], items[cfg.val_size :]
        else:
            raise MetatunerError(
                f"bettertogether: no validation items and train has only {len(items)} (needs more than "
                f"bettertogether.val_size={cfg.val_size}); set data.val_size or give more training items"
            )
        return val_set, items[: cfg.score_size], items[cfg.score_size :] or items

    def sample(self, step: int) -> list[Example]:
        return random.Random(self.seed * 1009 + step).sample(self.pool, min(self.cfg.traces, len(self.pool)))

    # ---- scoring ---------------------------------------------------------------------------------
    def predictor(self, program: Program) -> ProgramPredictor:
        return ProgramPredictor(self.model, self.tokenizer, program, self.mt)

    def validate(self, program: Program) -> float:
        return score_predictor(self.predictor(program), self.task, self.val_set, self.config)

    def score(self, program: Program) -> float:
        return score_predictor(self.predictor(program), self.task, self.score_set, self.config)

    def correct_traces(self, program: Program, queries: list[Example]) -> list[Example]:
        """The queries the program answers correctly, each with the program's own output as its target."""
        ev = getattr(self.config, "eval", None)
        result = evaluate(self.predictor(program), self.task, queries, batch_size=ev.batch_size if ev else 16,
                          max_new_tokens=ev.max_new_tokens if ev else None, likelihood=False, progress=False)
        metric = self.task.primary_metric
        return [replace(ex, target=r["output"]) for ex, r in zip(queries, result.records, strict=True)
                if r["scores"][metric] >= self.cfg.min_score]

    # ---- steps -----------------------------------------------------------------------------------
    def prompt_step(self, program: Program, step: int, record: dict[str, Any]) -> Program:
        if self.cfg.prompt_optimizer == "opro":
            return self.opro_step(program, step, record)
        return self.demos_step(program, step, record)

    def demos_step(self, program: Program, step: int, record: dict[str, Any]) -> Program:
        """Bootstrapped demos chosen by random search; the current demos are a candidate (kept on ties)."""
        cfg, queries = self.cfg, self.sample(step)
        pool = self.correct_traces(program, queries)
        record["bootstrapped"] = len(pool)
        if not pool:
            pool, record["demo_source"] = queries, "gold (no correct traces)"
        rng = random.Random(self.seed * 1009 + step)
        candidates, seen = [], set()
        for demos in [program.demos] + [rng.sample(pool, min(cfg.demos, len(pool))) for _ in range(cfg.trials)]:
            key = tuple(sorted(d.id for d in demos))
            if key not in seen:
                seen.add(key)
                candidates.append((self.score(replace(program, demos=demos)), demos))
        record["search"] = [{"demos": [d.id for d in demos], "score": s} for s, demos in candidates]
        return replace(program, demos=max(candidates, key=lambda c: c[0])[1])

    def opro_step(self, program: Program, step: int, record: dict[str, Any]) -> Program:
        """OPRO's search over the instruction, with the program's demos and LoRA in place."""
        if self.proposer is None:
            self.proposer = default_proposer(self.config, self.model, self.tokenizer)
        history = optimize_instruction(
            program.instruction, lambda ins: self.score(replace(program, instruction=ins)), self.proposer,
            self.score_set, opro_config(self.config), self.seed * 1009 + step,
        )
        record["search"] = [{"instruction": i, "score": s} for i, s in history]
        return replace(program, instruction=best_of(history)[0])

    def budget(self) -> int:
        """Optimizer steps of all its w steps (its prompt steps take none)."""
        rc = self.config if isinstance(self.config, RunConfig) else RunConfig()
        cfg = rc.bettertogether
        return parse_strategy(cfg.strategy).count("w") * (cfg.w_steps or rc.train.steps)

    def weight_step(self, program: Program, step: int, record: dict[str, Any]) -> Program:
        """A fresh static LoRA on M, SFT on (instruction, x) -> the program's own correct outputs."""
        from metatuner.models.metatuner import MetaTuner
        from metatuner.training.trainer import Trainer

        rc = self.config if isinstance(self.config, RunConfig) else RunConfig()
        queries = self.sample(step)
        traces = self.correct_traces(program, queries)
        record["traces"] = len(traces)
        if not traces:
            traces, record["fallback"] = queries, "no correct traces: trained on gold targets"
        if self.mt is None:
            self.mt = MetaTuner(self.model, self.tokenizer, rc.generator, rc.hypernet, use_hypernet=False,
                                use_prompt=False)
        Trainer(rc, self.mt, self.task, traces, [], self.run_dir).warmup_actor(
            self.cfg.w_steps or rc.train.steps, instruction=program.instruction
        )
        lora = {k: v.detach().clone() for k, v in self.mt.m_lora.adapter_state("static").items()}
        return Program(program.instruction, [], lora)
