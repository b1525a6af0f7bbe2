"""BetterTogether (Soylu, Potts and Khattab, 2024) as DSPy 3.4.1 runs it: prompt optimization and fine-tuning in turns.

A *program* is (instruction, few-shot demos, static LoRA on M or none). The strategy string, default
``"p -> w -> p"``, lists the steps, each applied to the current program. Before each step the training
items are reshuffled (DSPy's ``shuffle_trainset_between_steps``) and the step works on the first
``traces`` of them (DSPy: all of them).

- ``p``, prompt optimization, by ``prompt_optimizer``:
  ``demos`` (default): DSPy's ``BootstrapFewShotWithRandomSearch`` with its candidate set: seed -3 zero-shot
  (no demos), seed -2 labeled-only (``max_labeled_demos`` gold demos sampled with ``Random(0)``), seed -1
  ``BootstrapFewShot`` on the unshuffled items with ``max_bootstrapped_demos``, and seeds 0..``candidates``-1
  ``BootstrapFewShot`` on the items shuffled by ``Random(seed)`` with ``Random(seed).randint(1,
  max_bootstrapped_demos)`` demos. ``BootstrapFewShot``: a teacher (the program with ``max_labeled_demos``
  labeled demos, the query itself left out of them) answers the items in order until enough are correct;
  those become demos with the teacher's own output as the answer, and the demos are filled up to
  ``max_labeled_demos`` with gold-labeled items that were not bootstrapped (DSPy's sampling, seeded 0).
  Every candidate is scored on validation; the first best is kept. ``backend: dspy`` runs DSPy's own
  optimizer on the task model instead (:mod:`metatuner.methods.bettertogether_dspy`).
  ``opro``: OPRO's instruction search (:mod:`metatuner.methods.opro`, settings from ``opro.*``) with the
  program's demos and LoRA in place, scored on ``score_size`` training queries (not in DSPy).
- ``w``, DSPy's ``BootstrapFinetune``: the program (with its demos and LoRA) answers the step's items, and a
  fresh static LoRA on M (:class:`~metatuner.models.static.StaticLoRA`) is trained by the SFT baseline's
  :func:`~metatuner.training.sft.fine_tune` on its correct answers, rendered with the program's demos in
  the prompt; the fine-tuned program keeps its demos (``exclude_demos: false``, DSPy's
  default; ``true`` trains and answers without them). When no answer is correct the step is skipped and
  recorded (DSPy has no gold fallback); ``gold_fallback: true`` trains on gold targets instead.

Every program is scored on validation (``val``, or when it is empty a seeded slice of train that is never
fitted on). ``returns: final`` (default) returns the program after the last step, as DSPy's paper-era
BetterTogether; ``best`` the best step on validation (earlier wins ties), as DSPy 3.4.1 does when it holds
a valset. ``describe()`` records both (``chosen_step``/``chosen_kind``/``val_score`` for the returned one,
``best_step``/``best_kind``/``best_val_score``). A step that raises ends the strategy: its error is
recorded and the program so far (final) or the best so far (best) is returned.

Departures from DSPy: the items per step are capped at ``traces``; bootstrapping takes one round at the
program's own decoding (``max_rounds=1``, DSPy's default); the teacher and the candidates answer with the
current program's LoRA (DSPy 3.4.1's reset copies fall back to the globally configured LM); programs that
are identical are scored once (decoding is greedy, so the score is the same); each w step trains a fresh
LoRA on the base model for ``w_steps`` steps rather than fine-tuning the previous fine-tuned model to
convergence.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import random
import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import torch
from tqdm import tqdm

from metatuner import files
from metatuner.config import RunConfig
from metatuner.errors import MetatunerError
from metatuner.evaluation.generation import render_chat
from metatuner.evaluation.harness import evaluate, select
from metatuner.evaluation.predictors import LMPredictor
from metatuner.methods.base import METHODS, Method
from metatuner.methods.opro import best_of, default_proposer, opro_config, optimize_instruction, score_predictor
from metatuner.options import _at_least, non_negative, option
from metatuner.tasks.base import Example, Task

STEPS = {"p": "prompt optimization", "w": "fine-tuning on own correct traces"}


def parse_strategy(strategy: str) -> list[str]:
    """``"p -> w -> p"`` -> ``["p", "w", "p"]``; anything but p and w joined by ``->`` is an error."""
    steps = [s.strip() for s in strategy.split("->")]
    bad = [s for s in steps if s not in STEPS]
    if bad:
        allowed = ", ".join(f"{k} ({v})" for k, v in STEPS.items())
        raise MetatunerError(
            f"bettertogether.strategy {strategy!r} has unknown step {bad[0]!r}; allowed steps: {allowed}, "
            f"joined by '->' (e.g. 'p -> w -> p')"
        )
    return steps


@dataclass
class BetterTogetherConfig:
    """BetterTogether as DSPy runs it (``BootstrapFewShotWithRandomSearch`` for p, ``BootstrapFinetune`` for w);
    the defaults are DSPy's, ``traces`` and ``val_size`` scale it to the machine."""

    strategy: str = option("p -> w -> p", "steps in order, joined by '->': p = prompt optimization, w = fine-tuning")
    prompt_optimizer: str = option(
        "demos", "p step: DSPy's BootstrapFewShotWithRandomSearch (demos), or OPRO's instruction search (opro.*)",
        ("demos", "opro"),
    )
    backend: str = option(
        "own", "own: this package's implementation of DSPy's optimizers; dspy: DSPy itself runs the demos p step "
        "(pip install 'metatuner[dspy]'), our SFT runs the w step", ("own", "dspy"),
    )
    max_bootstrapped_demos: int = option(4, "p step: most bootstrapped (own correct output) demos per candidate "
                                            "(DSPy's max_bootstrapped_demos, default 4)")
    max_labeled_demos: int = option(16, "p step: demos per candidate filled up to this with gold-labeled ones; the "
                                        "labeled-only candidate has this many (DSPy's max_labeled_demos, default 16; "
                                        "0: none)")
    candidates: int = option(16, "p step: random-seed candidates besides zero-shot, labeled-only and unshuffled "
                                 "(DSPy's num_candidate_programs, default 16; 0: those three only)")
    traces: int = option(64, "training items each step works on, reshuffled per step: the p step bootstraps and "
                             "labels demos from them, the w step fine-tunes on the program's correct answers to "
                             "them (DSPy: the whole trainset)")
    min_score: float = option(1.0, "a trace counts as correct when its primary-metric score is at least this")
    exclude_demos: bool = option(False, "w step: fine-tune without the program's demos in the inputs and drop them "
                                        "afterwards (DSPy's BootstrapFinetune exclude_demos, default False)")
    gold_fallback: bool = option(False, "w step: when no trace is correct, fine-tune on gold targets (not in DSPy); "
                                        "false: the w step is skipped and recorded")
    returns: str = option("final", "final: the program after the last step (DSPy's final program); best: the best "
                                   "step on validation (earlier wins ties); both are recorded", ("final", "best"))
    w_steps: int | None = option(None, "SFT steps per w step (unset: train.steps, as the sft baseline)")
    val_size: int = option(32, "validation items every candidate and step is scored on; carved from train when val "
                               "is empty")
    score_size: int = option(32, "prompt_optimizer=opro only: training queries each instruction is scored on")
    demos: int | None = option(None, "deprecated: old name of max_bootstrapped_demos (still read)")
    trials: int | None = option(None, "deprecated: old name of candidates (still read)")

    def __post_init__(self):
        parse_strategy(self.strategy)
        for old, new, low in (("demos", "max_bootstrapped_demos", 1), ("trials", "candidates", 0)):
            if getattr(self, old) is not None:  # old configs and saved runs keep loading
                _at_least(f"bettertogether.{old}", getattr(self, old), low)
                setattr(self, new, getattr(self, old))
                setattr(self, old, None)
        for name in ("max_bootstrapped_demos", "traces", "val_size", "score_size", "w_steps"):
            _at_least(f"bettertogether.{name}", getattr(self, name), 1)
        for name in ("max_labeled_demos", "candidates"):
            _at_least(f"bettertogether.{name}", getattr(self, name), 0)
        non_negative("bettertogether", self, "min_score")


logger = logging.getLogger(__name__)


@dataclass
class Program:
    instruction: str
    demos: list[Example] = field(default_factory=list)
    lora: dict[str, torch.Tensor] | None = None  # a snapshot of M's static LoRA (StaticLoRA.snapshot())

    def summary(self) -> dict[str, Any]:
        demos = [d.id for d in self.demos]
        return {"instruction": self.instruction, "demos": demos, "static_lora": self.lora is not None}

    def key(self) -> tuple:
        """Identical programs answer identically (greedy decoding): the key of a score cache."""
        return (self.instruction, tuple((d.id, d.target) for d in self.demos), id(self.lora) if self.lora else None)


class ProgramPredictor(LMPredictor):
    """A program as a predictor: its instruction and demos, and its static LoRA active while it answers."""

    def __init__(self, model, tokenizer, program: Program, static=None, name: str = "bettertogether",
                 details: dict[str, Any] | None = None):
        super().__init__(model, tokenizer, program.instruction, name=name, demos=program.demos)
        self.program, self.static, self.details = program, static, details or {}

    @contextlib.contextmanager
    def weights(self, task: Task, examples: list[Example]) -> Iterator[None]:
        if self.program.lora is None:
            yield
            return
        # programs share one static adapter slot on M, so each loads its own snapshot before answering
        self.static.load_snapshot(self.program.lora)
        with self.static.active():
            yield

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"static_lora": self.program.lora is not None} | self.details


class TeacherPredictor(ProgramPredictor):
    """BootstrapFewShot's teacher: the program with its labeled demos, each query answered without itself among
    them (as DSPy), so that one batch holds queries whose demos differ."""

    def messages(self, task: Task, instruction: str, example: Example) -> list[dict[str, str]]:
        view = copy.copy(self)
        view.demos = [d for d in self.demos if d.id != example.id]
        return LMPredictor.messages(view, task, instruction, example)


@METHODS.register("bettertogether")
class BetterTogether(Method):
    """Runs the strategy's steps on (instruction, demos, LoRA); returns the final or the best program on validation."""

    needs_training = True
    config_class = BetterTogetherConfig

    def __init__(self, model, tokenizer, config: Any = None, run_dir=None, proposer=None):
        super().__init__(model, tokenizer, config, run_dir)
        self.proposer = proposer  # OPRO's optimizer LM for prompt_optimizer=opro (default: the task model)
        self.history: list[dict[str, Any]] = []
        self.static = None  # M's static LoRA slot (a StaticLoRA), built at the first w step
        self.scores: dict[tuple, float] = {}  # validation scores by Program.key()
        self.w_done = 0  # optimizer steps taken by earlier w steps (the learning-curve offset)
        self.progress = True  # a tqdm bar over each p step's candidates (stderr)

    @property
    def cfg(self) -> BetterTogetherConfig:
        return self.method_config

    @property
    def w_steps(self) -> int:
        train = getattr(self.config, "train", None)
        return self.cfg.w_steps or (train.steps if train else RunConfig().train.steps)

    def fit(self, task: Task, train: list[Example], val: list[Example]) -> ProgramPredictor:
        cfg = self.cfg
        steps = parse_strategy(cfg.strategy)
        if not train:
            raise MetatunerError(f"bettertogether needs training items of task {task.name!r}")
        if cfg.backend == "dspy" and cfg.prompt_optimizer != "demos" and "p" in steps:
            raise MetatunerError("bettertogether.backend=dspy runs DSPy's BootstrapFewShotWithRandomSearch; set "
                                 "bettertogether.prompt_optimizer=demos, or backend=own for opro")
        if cfg.backend == "dspy" and "p" in steps:
            from metatuner.methods.bettertogether_dspy import require_dspy

            require_dspy()  # a missing extra is the user's to fix, not a step that fails
        self.task, self.seed = task, getattr(self.config, "seed", 0)
        self.val_set, self.score_set, self.pool = self.split(train, val)
        self.rng = random.Random(self.seed)  # DSPy: random.Random(seed) shuffles the trainset before each step
        self.items: list[Example] = self.pool[: cfg.traces]
        self.scores, self.w_done = {}, 0
        program = Program(task.instruction)
        programs = [program]
        self.history = [{"step": 0, "kind": "initial", **program.summary(), "val_score": self.validate(program)}]
        for i, kind in enumerate(steps, 1):
            record: dict[str, Any] = {"step": i, "kind": kind}
            self.history.append(record)
            self.rng.shuffle(self.pool)
            self.items = self.pool[: cfg.traces]
            began = time.perf_counter()
            try:
                program = {"p": self.prompt_step, "w": self.weight_step}[kind](program, i, record)
                record.update(program.summary(), val_score=self.validate(program),
                              seconds=round(time.perf_counter() - began, 2))
            except Exception as e:  # noqa: BLE001 - KeyboardInterrupt is no Exception and still stops the fit
                record["error"] = f"{type(e).__name__}: {e}"
                logger.warning("bettertogether step %d (%s) failed; keeping the programs so far", i, kind,
                               exc_info=True)
                break
            programs.append(program)
        if "w" not in steps:
            self.at_step(0, lambda: self.predictor(programs[-1]))
        done = [r for r in self.history if "error" not in r]
        final = len(done) - 1
        best = max(range(len(done)), key=lambda s: (done[s]["val_score"], -s))  # earlier wins ties
        chosen = final if cfg.returns == "final" else best
        details = {
            "strategy": cfg.strategy, "returns": cfg.returns, "backend": cfg.backend,
            "chosen_step": chosen, "chosen_kind": done[chosen]["kind"], "val_score": done[chosen]["val_score"],
            "best_step": best, "best_kind": done[best]["kind"], "best_val_score": done[best]["val_score"],
            "steps": self.history,
        }
        if self.run_dir is not None:
            files.write_text(self.run_dir / "bettertogether.json", json.dumps(details, indent=2, ensure_ascii=False))
        return ProgramPredictor(self.model, self.tokenizer, programs[chosen], self.static, details=details)

    # ---- data ------------------------------------------------------------------------------------
    def split(self, train: list[Example], val: list[Example]) -> tuple[list[Example], ...]:
        """(validation, OPRO's scoring subset, training pool): a seeded shuffle of train; validation from ``val``
        if any. The scoring subset is held out of the pool only for prompt_optimizer=opro."""
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
        if cfg.prompt_optimizer == "opro":
            return val_set, items[: cfg.score_size], items[cfg.score_size :] or items
        return val_set, items[: cfg.score_size], items

    # ---- scoring ---------------------------------------------------------------------------------
    def predictor(self, program: Program) -> ProgramPredictor:
        return ProgramPredictor(self.model, self.tokenizer, program, self.static)

    def validate(self, program: Program) -> float:
        key = program.key()
        if key not in self.scores:
            self.scores[key] = score_predictor(self.predictor(program), self.task, self.val_set, self.config)
        return self.scores[key]

    def score(self, program: Program) -> float:
        return score_predictor(self.predictor(program), self.task, self.score_set, self.config)

    def answer(self, program: Program, queries: list[Example], teacher: bool = False) -> list[tuple[str, bool]]:
        """(output, correct) of the program for each query (``teacher``: each without itself among the demos)."""
        if not queries:
            return []
        ev = getattr(self.config, "eval", None)
        predictor = (TeacherPredictor if teacher else ProgramPredictor)(self.model, self.tokenizer, program,
                                                                        self.static)
        result = evaluate(predictor, self.task, queries, batch_size=ev.batch_size if ev else 16,
                          max_new_tokens=ev.max_new_tokens if ev else None, likelihood=False, progress=False)
        metric = self.task.primary_metric
        return [(r["output"], r["scores"][metric] >= self.cfg.min_score) for r in result.records]

    def correct_traces(self, program: Program, queries: list[Example]) -> list[Example]:
        """The queries the program answers correctly, each with the program's own output as its target."""
        return [replace(ex, target=out) for ex, (out, ok) in zip(queries, self.answer(program, queries), strict=True)
                if ok]

    # ---- p: BootstrapFewShotWithRandomSearch -------------------------------------------------------
    def prompt_step(self, program: Program, step: int, record: dict[str, Any]) -> Program:
        if self.cfg.prompt_optimizer == "opro":
            return self.opro_step(program, step, record)
        if self.cfg.backend == "dspy":
            from metatuner.methods.bettertogether_dspy import dspy_demos_step

            return dspy_demos_step(self, program, step, record)
        return self.demos_step(program, step, record)

    def demos_step(self, program: Program, step: int, record: dict[str, Any]) -> Program:
        """DSPy's candidate set (seeds -3..candidates-1), each scored on validation; the first best is kept."""
        cfg, trainset = self.cfg, list(self.items)
        self.teacher_cache: dict[tuple, tuple[str, bool]] = {}
        search, best = [], None
        seeds = range(-3, cfg.candidates)
        for seed in tqdm(seeds, desc=f"bettertogether p{step} candidates", disable=not self.progress):
            demos, info = self.candidate(program, trainset, seed)
            candidate = replace(program, demos=demos)
            score = self.validate(candidate)
            search.append({"seed": seed, **info, "demos": [d.id for d in demos], "score": score})
            if best is None or score > best[0]:
                best = (score, seed, candidate)
        record["search"], record["candidate_seed"] = search, best[1]
        return best[2]

    def candidate(self, program: Program, trainset: list[Example], seed: int) -> tuple[list[Example], dict]:
        """The demos of DSPy's candidate ``seed`` (random_search.py), with what they are made of."""
        cfg = self.cfg
        if seed == -3:  # zero-shot
            return [], {"bootstrapped": 0, "labeled": 0}
        if seed == -2:  # LabeledFewShot(k=max_labeled_demos), sample=True
            demos = random.Random(0).sample(trainset, min(cfg.max_labeled_demos, len(trainset)))
            return demos, {"bootstrapped": 0, "labeled": len(demos)}
        order, size = list(trainset), cfg.max_bootstrapped_demos
        if seed >= 0:
            random.Random(seed).shuffle(order)
            size = random.Random(seed).randint(1, cfg.max_bootstrapped_demos)
        return self.bootstrap(program, order, size)

    def bootstrap(self, program: Program, order: list[Example], size: int) -> tuple[list[Example], dict]:
        """DSPy's BootstrapFewShot on ``order`` with max_bootstrapped_demos=``size``."""
        cfg = self.cfg
        # the teacher: the program with LabeledFewShot(max_labeled_demos) demos (its own demos when that is 0)
        teacher = random.Random(0).sample(order, min(cfg.max_labeled_demos, len(order))) if cfg.max_labeled_demos \
            else list(program.demos)
        boot: dict[int, Example] = {}
        batch = getattr(getattr(self.config, "eval", None), "batch_size", 16)
        i = 0
        while i < len(order) and len(boot) < size:
            chunk = order[i : i + batch]
            for j, (ex, (out, ok)) in enumerate(zip(chunk, self.teacher_answers(program, teacher, chunk))):
                if len(boot) >= size:
                    break
                if ok:
                    boot[i + j] = replace(ex, target=out)
            i += len(chunk)
        raw = [ex for k, ex in enumerate(order) if k not in boot]  # every item not bootstrapped, visited or not
        random.Random(0).shuffle(raw)
        augmented = list(boot.values())[:size]
        labeled = random.Random(0).sample(raw, max(0, min(cfg.max_labeled_demos - len(augmented), len(raw))))
        return augmented + labeled, {"bootstrapped": len(augmented), "labeled": len(labeled), "visited": i}

    def teacher_answers(self, program: Program, teacher: list[Example], queries: list[Example]) -> list[tuple]:
        """The teacher's (output, correct) per query, in one batch; cached per p step (the same query under the
        same teacher demos answers the same)."""
        key = tuple(d.id for d in teacher)
        todo = [ex for ex in queries if (ex.id, key) not in self.teacher_cache]
        for ex, ans in zip(todo, self.answer(replace(program, demos=teacher), todo, teacher=True), strict=True):
            self.teacher_cache[(ex.id, key)] = ans
        return [self.teacher_cache[(ex.id, key)] for ex in queries]

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

    # ---- w: BootstrapFinetune ----------------------------------------------------------------------
    def budget(self) -> int:
        """Optimizer steps of all its w steps (its prompt steps take none)."""
        return parse_strategy(self.cfg.strategy).count("w") * self.w_steps

    def weight_step(self, program: Program, step: int, record: dict[str, Any]) -> Program:
        """A fresh static LoRA on M, SFT on the program's own correct outputs (its demos in the inputs)."""
        from metatuner.models.metatuner import draw_like_construction
        from metatuner.models.static import StaticLoRA
        from metatuner.training.sft import fine_tune

        cfg = self.cfg
        rc = self.config if isinstance(self.config, RunConfig) else RunConfig()
        queries = self.items
        traces = self.correct_traces(program, queries)
        record["traces"] = len(traces)
        offset, steps = self.w_done, self.w_steps
        self.w_done += steps
        if not traces:
            if not cfg.gold_fallback:
                record["skipped"] = "no correct traces (bettertogether.gold_fallback=true trains on gold targets)"
                for k in range(0 if offset == 0 else 1, steps + 1):  # the curve stays flat over its steps
                    self.at_step(offset + k, lambda: self.predictor(program))
                return program
            traces, record["fallback"] = queries, "no correct traces: trained on gold targets"
        if self.static is None:
            # the same seed gives the first w step's LoRA the initial values the sft baseline's starts from
            draw_like_construction(self.model, rc.generator, rc.hypernet)
            self.static = StaticLoRA.from_config(self.model, self.tokenizer, rc)
        demos = [] if cfg.exclude_demos else list(program.demos)
        render = self.renderer(demos)  # the SFT inputs are rendered as the program answers
        record["trained_with_demos"] = len(demos)
        inputs = render(self.task, traces, [program.instruction] * len(traces))
        long = sum(len(self.tokenizer(x + ex.target).input_ids) > rc.train.max_length for x, ex in zip(inputs, traces))
        if long:  # SFT keeps the last max_length tokens: the instruction and the first demos would be cut
            record["truncated_inputs"] = long
            logger.warning("bettertogether w step: %d of %d SFT inputs with %d demos exceed train.max_length=%d and "
                           "are cut from the left; raise train.max_length or lower bettertogether.max_labeled_demos",
                           long, len(traces), len(demos), rc.train.max_length)
        def on_step(k: int) -> None:
            if k > 0 or offset == 0:
                self.at_step(offset + k, lambda: self.predictor(Program(program.instruction, demos, self.snapshot())))

        fine_tune(self.static, rc, self.task, traces, steps, self.run_dir, instruction=program.instruction,
                  render=render, on_step=on_step)
        self.trainable_params = sum(p.numel() for p in self.static.parameters())
        return Program(program.instruction, demos, self.snapshot())

    def snapshot(self) -> dict[str, torch.Tensor]:
        return self.static.snapshot()

    def renderer(self, demos: list[Example]):
        """How M's SFT inputs are rendered (a :data:`~metatuner.models.static.Render`): each query with
        ``demos`` as earlier turns, as the program answers."""
        shots = LMPredictor(self.model, self.tokenizer, demos=demos)

        def actor_inputs(task: Task, examples: list[Example], prompts: list[str]) -> list[str]:
            return [render_chat(self.tokenizer, shots.messages(task, p, ex)) for p, ex in zip(prompts, examples)]

        return actor_inputs
