"""BetterTogether's demos p step run by DSPy itself (``bettertogether.backend: dspy``).

Needs the optional extra: ``pip install 'metatuner[dspy]'``.

DSPy 3.4.1's ``BootstrapFewShotWithRandomSearch`` (its defaults scaled by ``bettertogether.*``: candidates,
max_bootstrapped_demos, max_labeled_demos, min_score as its metric_threshold) optimizes a one-predictor
program ``query -> answer`` whose instructions are the program's instruction, on the step's training items,
scoring candidates on BetterTogether's validation items. It runs on the local task model, in process:

- :func:`local_lm` is a ``dspy.BaseLM`` whose ``forward`` renders DSPy's chat messages with the model's chat
  template and decodes with :func:`metatuner.evaluation.generation.generate` (greedy, the task's stop strings,
  ``eval.max_new_tokens``), with the current program's LoRA applied; it returns an OpenAI-shaped response.
  No server, no network, no DSPy cache (a fine-tuned program answers differently to the same messages).
- :func:`task_adapter` is a ``dspy.Adapter`` that formats a call as this package's predictors do (the
  instruction as system message, demos as earlier user/assistant turns, the task's own user turn) and parses
  the whole completion as ``answer``, so that a DSPy candidate answers exactly as the same
  :class:`~metatuner.methods.bettertogether.Program` does, and the task's ``grade`` is DSPy's metric.

DSPy calls the model one query at a time (``num_threads=1``): slower than the ``own`` backend, which batches.
The w steps stay this package's SFT on the program's correct traces (DSPy's BootstrapFinetune keeps those).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import torch

from metatuner.errors import MetatunerError
from metatuner.evaluation.generation import generate, render_chat
from metatuner.evaluation.predictors import LMPredictor
from metatuner.tasks.base import Example

DSPY_VERSION = "3.4.1"


def require_dspy():
    """The dspy module, or a MetatunerError saying how to install it."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm would fetch a price list at import
    try:
        import dspy
    except ImportError as e:
        raise MetatunerError(
            "bettertogether.backend=dspy needs DSPy: pip install 'metatuner[dspy]' (dspy==3.4.1), or set "
            "bettertogether.backend=own"
        ) from e
    if dspy.__version__ != DSPY_VERSION:
        warnings.warn(f"bettertogether.backend=dspy was written against dspy=={DSPY_VERSION}, found "
                      f"{dspy.__version__}", stacklevel=2)
    return dspy


def local_lm(dspy, method, program):
    """A ``dspy.BaseLM`` answering with the task model under ``program``'s LoRA (its instruction and demos
    come in DSPy's messages)."""

    class LocalLM(dspy.BaseLM):
        def __init__(self):
            super().__init__(model=f"metatuner-local/{method.model.config._name_or_path}", model_type="chat",
                             temperature=0.0, cache=False, num_retries=0)

        def forward(self, prompt=None, messages=None, **kwargs):
            messages = messages or [{"role": "user", "content": prompt}]
            ev = getattr(method.config, "eval", None)
            budget = (ev.max_new_tokens if ev else None) or method.task.max_new_tokens
            rendered = render_chat(method.tokenizer, messages)
            with torch.no_grad(), method.predictor(program).weights(method.task, []):
                out = generate(method.model, method.tokenizer, [rendered], budget, method.task.stop)[0]
            message = SimpleNamespace(role="assistant", content=out.text, tool_calls=None, reasoning_content=None)
            return SimpleNamespace(
                choices=[SimpleNamespace(message=message, finish_reason="stop", logprobs=None)],
                usage={"completion_tokens": out.new_tokens}, model=self.model, cache_hit=False,
            )

    return LocalLM()


def task_adapter(dspy, method, examples: dict[str, Example]):
    """A ``dspy.Adapter`` formatting calls as this package's predictors do; the completion is the answer."""

    def example(query: str) -> Example:
        return examples.get(query) or Example(id="?", query=query, answer="", target="")

    class TaskAdapter(dspy.Adapter):
        def format(self, signature, demos, inputs):
            shots = [replace(example(d["query"]), target=d["answer"]) for d in demos
                     if d.get("query") is not None and d.get("answer") is not None]
            return LMPredictor(None, None, demos=shots).messages(method.task, signature.instructions,
                                                                 example(inputs["query"]))

        def parse(self, signature, completion):
            return {"answer": completion}

    return TaskAdapter()


def dspy_demos_step(method, program, step: int, record: dict[str, Any]):
    """DSPy's BootstrapFewShotWithRandomSearch on the step's items, candidates scored on validation."""
    dspy = require_dspy()
    cfg, task = method.cfg, method.task
    examples = {ex.query: ex for ex in list(method.pool) + list(method.val_set)}

    def as_dspy(ex: Example):
        return dspy.Example(id=ex.id, query=ex.query, answer=ex.target).with_inputs("query")

    def metric(gold, pred, trace=None) -> float:
        ex = examples.get(gold.query) or Example(id=gold.id, query=gold.query, answer="", target=gold.answer)
        return float(task.grade(pred.answer or "", ex)[1][task.primary_metric])

    signature = dspy.Signature({"query": dspy.InputField(), "answer": dspy.OutputField()}, program.instruction)
    student = dspy.Predict(signature)
    student.demos = [dspy.Example(id=d.id, query=d.query, answer=d.target) for d in program.demos]
    lm, adapter = local_lm(dspy, method, program), task_adapter(dspy, method, examples)
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr), \
            dspy.context(lm=lm, adapter=adapter):
        warnings.simplefilter("ignore", DeprecationWarning)  # DSPy 3.4 deprecates forward()-style custom LMs
        optimizer = dspy.BootstrapFewShotWithRandomSearch(
            metric=metric, max_bootstrapped_demos=cfg.max_bootstrapped_demos,
            max_labeled_demos=cfg.max_labeled_demos, num_candidate_programs=cfg.candidates, num_threads=1,
            metric_threshold=cfg.min_score,
        )
        best = optimizer.compile(student, trainset=[as_dspy(ex) for ex in method.items],
                                 valset=[as_dspy(ex) for ex in method.val_set])

    def ours(demos) -> list[Example]:
        return [replace(examples[d["query"]], target=d["answer"]) for d in demos]

    record["search"] = [{"seed": c["seed"], "demos": [d.id for d in ours(c["program"].predictors()[0].demos)],
                         "score": c["score"] / 100} for c in sorted(best.candidate_programs, key=lambda c: c["seed"])]
    record["candidate_seed"] = next(c["seed"] for c in best.candidate_programs if c["program"] is best)
    record["dspy"] = dspy.__version__
    return replace(program, demos=ours(best.predictors()[0].demos))
