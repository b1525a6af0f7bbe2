"""Rollouts: sample prompts from G, score each with M, keep the best per query (the expert set D2).

Rewards (higher is better):

- ``nll``: minus the mean token NLL of the gold target under M with the candidate prompt and the query's
  generated LoRA, teacher forced: one forward pass per candidate, no decoding (the cheap default);
- ``em``: M decodes an answer greedily with the candidate prompt and the task's primary metric scores it.

The task's initial instruction ``p~`` is always a candidate too, so a query's expert prompt is only a
rewrite when some rewrite scores better than ``p~``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metatuner.evaluation.generation import generate
from metatuner.models.metatuner import Factors, MetaTuner, repeat_factors
from metatuner.tasks.base import Example, Task


@dataclass
class RolloutResult:
    best_prompts: list[str]
    best_rewards: list[float]
    mean_reward: float  # over the sampled rewrites (p~ excluded): tracks G's quality
    initial_reward: float  # mean reward of p~


@torch.no_grad()
def score_prompts(
    mt: MetaTuner, task: Task, examples: list[Example], prompts: list[str], factors: Factors | None,
    reward: str, max_length: int,
) -> torch.Tensor:
    """Reward of each (example, prompt) pair; ``factors`` belong row by row to ``examples``."""
    if reward == "nll":
        return -mt.answer_nll(task, examples, prompts, factors, max_length)
    with mt.as_actor(factors):
        gens = generate(mt.actor, mt.tokenizer, mt.actor_inputs(task, examples, prompts), task.max_new_tokens, task.stop)
    scores = [task.grade(g.text, ex)[1][task.primary_metric] for g, ex in zip(gens, examples)]
    return torch.tensor(scores)


@torch.no_grad()
def rollout(
    mt: MetaTuner, task: Task, examples: list[Example], factors: Factors | None, n: int, temperature: float,
    reward: str = "nll", max_length: int = 512,
) -> RolloutResult:
    """Samples ``n`` rewrites per query, scores them and ``p~``, and returns the best per query."""
    sampled = mt.generate_prompts(task, examples, sample=True, n=n, temperature=temperature)
    candidates = [
        c for i, ex in enumerate(examples) for c in (*sampled[i * n : (i + 1) * n], task.instruction_for(ex))
    ]
    per_query = n + 1
    reps = [ex for ex in examples for _ in range(per_query)]
    rewards = score_prompts(
        mt, task, reps, candidates, repeat_factors(factors, per_query), reward, max_length
    ).view(len(examples), per_query)  # [bs, n + 1]; last column is p~
    best = rewards.argmax(1)
    return RolloutResult(
        best_prompts=[candidates[i * per_query + int(j)] for i, j in enumerate(best)],
        best_rewards=rewards.max(1).values.tolist(),
        mean_reward=rewards[:, :n].mean().item(),
        initial_reward=rewards[:, n].mean().item(),
    )
