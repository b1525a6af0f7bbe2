"""Rollouts: sample outputs from G, score the prompts they make with M, keep the best per query (D2).

Per query the candidates are ``n`` sampled outputs of G, any ``extra`` ones (the frozen decoder's
greedy output, which the task loss uses anyway) and the output meaning "keep p~"; identical prompts are
scored once. Rewards (higher is better), compared only within a query's group of candidates:

- ``nll``: minus the mean token NLL of the gold target under M with the candidate prompt and the
  query's own generated LoRA, teacher forced: one forward pass per candidate, no decoding (the default:
  dense, so a rewrite that helps a little is seen even when no answer flips);
- ``em``: M decodes an answer greedily with the candidate prompt and the task's primary metric scores it.

A candidate that *leaks* (:func:`~metatuner.tasks.leaks.leaks`: it contains the gold answer, or states
an answer) is never chosen: guessing the answer into the prompt would be rewarded by the NLL.
The result gives each query's best candidate and its *gain*, its reward minus p~'s in the same
rollout, which the expert set compares across rollouts (:func:`offer`).

Rollouts need only what :class:`Proposer` lists: MetaTuner's G proposes prompts, BPO's rewriter
(:class:`~metatuner.methods.bpo.SelfRewriter`) proposes rewritten queries.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

import torch

from metatuner.evaluation.generation import Generation, generate
from metatuner.models.metatuner import Factors, select_rows
from metatuner.tasks.base import Example, Task
from metatuner.tasks.leaks import leaks


class Proposer(Protocol):
    """What a rollout needs of the model that proposes outputs (MetaTuner's G, BPO's rewriter) and of M."""

    actor: Any  # M
    tokenizer: Any  # M's tokenizer

    def generate_outputs(self, task: Task, examples: list[Example], *, sample: bool = False, n: int = 1,
                         temperature: float = 1.0) -> list[Generation]: ...

    def clean_output(self, gen: Generation) -> str: ...

    def keep_initial_output(self, task: Task, example: Example) -> str: ...

    def compose(self, task: Task, example: Example, output: str) -> str: ...

    def actor_inputs(self, task: Task, examples: list[Example], prompts: list[str]) -> list[str]: ...

    def as_actor(self, factors: Factors | None) -> contextlib.AbstractContextManager: ...

    def answer_nll(self, task: Task, examples: list[Example], prompts: list[str], factors: Factors | None,
                   max_length: int = 512, groups: list[int] | None = None) -> torch.Tensor: ...


@dataclass
class RolloutResult:
    best_outputs: list[str]  # per query: G's output to imitate ("keep p~" when nothing beat it)
    best_gains: list[float]  # per query: its reward minus p~'s reward (0 when p~ won)
    mean_reward: float  # over the sampled candidates that did not leak: tracks G's quality
    initial_reward: float  # mean reward of p~
    leaked: int  # sampled candidates excluded for leaking the answer


@torch.no_grad()
def score_prompts(
    mt: Proposer, task: Task, examples: list[Example], prompts: list[str], factors: Factors | None,
    reward: str, max_length: int, groups: list[int] | None = None,
) -> torch.Tensor:
    """Reward of each (example, prompt) pair; ``factors`` belong row by row to ``examples``; ``groups``: the
    query of each row (its candidates share their LoRA, so their common start runs once)."""
    if reward == "nll":
        return -mt.answer_nll(task, examples, prompts, factors, max_length, groups=groups)
    with mt.as_actor(factors):
        gens = generate(mt.actor, mt.tokenizer, mt.actor_inputs(task, examples, prompts), task.max_new_tokens, task.stop)
    scores = [task.grade(g.text, ex)[1][task.primary_metric] for g, ex in zip(gens, examples)]
    return torch.tensor(scores)


@torch.no_grad()
def rollout(
    mt: Proposer, task: Task, examples: list[Example], factors: Factors | None, n: int, temperature: float,
    reward: str = "nll", max_length: int = 512, extra: list[str] | None = None,
    samples: list[Generation] | None = None,
) -> RolloutResult:
    """Samples ``n`` outputs per query, scores them with ``extra[i]`` and "keep p~", returns the best per query.

    ``extra`` holds one more (cleaned) output per query, e.g. the frozen decoder's greedy one; ``samples``,
    when given, are the ``n`` sampled outputs per query already decoded (grouped by query).
    """
    if samples is not None:
        gens = samples
    else:
        gens = mt.generate_outputs(task, examples, sample=True, n=n, temperature=temperature) if n else []
    sampled = [mt.clean_output(g) for g in gens]
    groups: list[list[str]] = []  # per query: unique outputs, "keep p~" first
    leaked = 0
    for i, ex in enumerate(examples):
        group = [mt.keep_initial_output(task, ex)]
        own = sampled[i * n : (i + 1) * n] + ([extra[i]] if extra is not None else [])
        for j, out in enumerate(own):
            if out in group:
                continue
            if leaks(task, ex, out):
                leaked += j < n
                continue
            group.append(out)
        groups.append(group)
    rows = [i for i, g in enumerate(groups) for _ in g]
    flat = [(examples[i], out) for i, g in enumerate(groups) for out in g]
    prompts = [mt.compose(task, ex, out) for ex, out in flat]
    rewards = score_prompts(mt, task, [ex for ex, _ in flat], prompts, select_rows(factors, rows), reward,
                            max_length, rows).tolist()
    best_outputs, best_gains, initial, others = [], [], [], []
    pos = 0
    for group in groups:
        r = rewards[pos : pos + len(group)]
        pos += len(group)
        j = max(range(len(group)), key=lambda k: r[k])  # ties keep p~ (index 0)
        best_outputs.append(group[j])
        best_gains.append(r[j] - r[0])
        initial.append(r[0])
        others += r[1:]
    return RolloutResult(
        best_outputs=best_outputs, best_gains=best_gains,
        mean_reward=sum(others) / len(others) if others else float("nan"),
        initial_reward=sum(initial) / len(initial), leaked=leaked,
    )


def offer(experts, mt: Proposer, task: Task, batch: list[Example], factors: Factors | None, tc,
          gather: Callable[[Iterable], list], initial_output: Callable[[str], str], extra: list[str] | None = None,
          samples: list[Generation] | None = None) -> tuple[RolloutResult | None, list[tuple[str, str, float]]]:
    """Rolls out ``batch`` (this process's share; may be empty) with ``tc.rollouts`` samples at
    ``tc.temperature`` scored by ``tc.reward``, and offers every process's best outputs (``gather``) to the
    expert set ``experts``, each against ``initial_output(query id)``, the output meaning "keep p~".

    Returns the rollout's result (None for an empty batch) and the gathered ``(query id, output, gain)``.
    """
    r = rollout(mt, task, batch, factors, tc.rollouts, tc.temperature, tc.reward, tc.max_length,
                extra=extra, samples=samples) if batch else None
    triples = zip([ex.id for ex in batch], r.best_outputs, r.best_gains) if r else []
    gathered = gather(triples)
    for qid, output, gain in gathered:
        experts.offer(qid, output, gain, initial_output(qid))
    return r, gathered
