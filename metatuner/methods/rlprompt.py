"""RLPrompt (Deng et al., 2022): a frozen policy LM with a small trainable MLP writes a short discrete prompt,
trained with soft Q-learning (SQL) on the task reward.

Policy. The task model M itself, frozen, is the policy LM (no second copy). From a fixed, task-level context
(not per query) it writes ``prompt_length`` tokens; at each step its last hidden state ``h`` (after the final
norm) goes through a trainable MLP (Linear-ReLU-Linear, width ``hidden_size``, initialised near zero as in the
original) and then M's frozen output head: ``Q(s, .) = head(mlp(h))`` are the Q-values, and the policy is
``softmax(Q)``. With ``fluent_top_k`` = k > 0 only M's own top-k next tokens (``head(h)``) are allowed (the
original's "fluent" mode), so the prompt starts out as M's own fluent continuation and the MLP, starting from
uniform Q-values, learns which of those to prefer. Special tokens are never allowed.

Reward. Every sampled prompt is used as the instruction (appended to the task's p~, or replacing it:
``rlprompt.use``; append is the default: on 16 arithmetic validation items with SmolLM2-135M, three untrained
appended prompts gave the gold answer a mean log-probability of -1.05 to -1.07 and 6-19% accuracy, three
replacing ones -1.16 to -1.23 and 6-12%, since a 5-token prompt alone loses the task's answer format) for ``queries_per_step`` training queries. A query's reward is the mean log-probability of
its gold ``target`` under M (``reward=likelihood``, smooth, one teacher-forced pass; the analogue of the
original's piecewise likelihood-gap reward for classification) or the task's primary metric of M's greedy
answer (``reward=score``). Rewards are z-scored per query across the prompts of the step (the paper's
input-specific z-score), averaged over the queries and multiplied by ``reward_scale`` (the original's reward
shaping: [0, 1] -> [0, 5] for classification).

Loss (the original's ``sql_loss_impl=v2_v2r_v3_v3r`` without the reversed terms, which its released code
leaves off): see :func:`sql_loss`. The target network is a copy of the MLP, updated before every step by
Polyak averaging (:func:`polyak_update`) with rate ``target_rate``. The original's 0.001 over its 12,000
steps leaves e^-12 of the target's initial values; over this project's budgets (6 to 400 steps) the same
rate would leave 99% to 67% of them, so the target's values V' would stay those of the near-zero
initial MLP (uniform Q-values over the allowed tokens) and the loss would chase them instead of the
policy's own. Unset, the rate is scaled to the budget instead (``RLPromptConfig.polyak_rate``:
min(1, 12 / steps)), which moves the target as far over the run as the original does over its. Adam with
learning rate ``lr`` under train.lr_schedule and train.warmup_ratio; gradients clipped to norm ``grad_clip``
(the original's 5).

Selection. At the end the greedy prompt and ``candidates - 1`` sampled ones are scored on (up to
``val_size``) validation items by the task's primary metric; the best one wins (ties: the earlier, greedy
first), as the original picks prompts by validation reward. With no validation items the greedy prompt is
returned unscored.

Departures from the original code (github.com/mingkaid/rl-prompt): any causal LM of our loading stack
instead of GPT-2 only, and the policy LM is M itself, not a separate distilGPT-2; the fixed context is the
chat template's opening of the instruction (plus p~ when appending), not ``<|endoftext|>``; the default budget
is tiny (12 steps of 4 prompts x 4 queries, lr 1e-3, fluent top-20) where the paper runs 12,000 steps of
16 prompts at lr 5e-5 over the whole vocabulary (top-256); the reward is the target likelihood (or the task
score) since our tasks are generative, not verbalizer classification. Training is on-policy only, as in the
released RLPrompt (``training_mode=sql-onpolicy``); the off-policy mode of the SQL code base replays
ground-truth sequences, which prompts do not have.
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from metatuner import files
from metatuner.config import TrainConfig
from metatuner.errors import MetatunerError
from metatuner.evaluation.generation import continuation_logprobs, count_generated, generate, render_chat
from metatuner.evaluation.predictors import LMPredictor
from metatuner.methods.base import METHODS, Method, count_trainable
from metatuner.options import ConfigKeyError, _at_least, option, positive
from metatuner.tasks.base import Example, Task
from metatuner.training.schedule import make_scheduler

# the original RLPrompt's Polyak rate times its steps (0.001 x 12,000): the unset rlprompt.target_rate keeps it
RLPROMPT_TARGET_MOVES = 12.0


@dataclass
class RLPromptConfig:
    """The RLPrompt baseline: a frozen policy LM (M itself) with a trainable MLP writes a short discrete prompt,
    trained by soft Q-learning on the task reward."""

    steps: int = option(12, "soft Q-learning optimizer steps")
    prompt_length: int = option(5, "tokens of the learned prompt")
    prompts_per_step: int = option(4, "prompts sampled from the policy per step (>= 2: rewards are z-scored "
                                   "across them)")
    queries_per_step: int = option(4, "training queries every sampled prompt is rewarded on per step")
    use: str = option("append", "where the prompt goes: after the task instruction p~, or in its place",
                      ("append", "replace"))
    reward: str = option("likelihood", "per-query reward: mean log-probability of the gold target (smooth), or the "
                         "task's primary metric of M's greedy answer", ("likelihood", "score"))
    reward_scale: float = option(5.0, "z-scored rewards are multiplied by this (the original's reward shaping)")
    hidden_size: int = option(2048, "hidden width of the policy's MLP adapter")
    lr: float = option(1e-3, "Adam learning rate of the MLP (schedule and warm-up: train.lr_schedule, "
                       "train.warmup_ratio)")
    grad_clip: float = option(5.0, "clip the MLP's gradient to this norm (0: off), as the original")
    target_rate: float | None = option(None, "Polyak rate of the target MLP (target <- (1 - rate) target + rate "
                                       "policy, before every step); unset: scaled to the budget, min(1, 12 / steps), "
                                       "so the target trails the policy by 1/12 of the run as in the original (0.001 "
                                       "over 12,000 steps)")
    fluent_top_k: int = option(20, "sample only among M's own top-k next tokens (the original's 'fluent' mode; 0: "
                               "the whole vocabulary)")
    top_k: int = option(256, "sample among the policy's top-k tokens while training (0: all)")
    candidates: int = option(4, "prompts scored on validation at the end: the greedy one, then samples")
    val_size: int = option(32, "validation items each candidate prompt is scored on")

    def __post_init__(self):
        for name in ("steps", "prompt_length", "prompts_per_step", "queries_per_step", "hidden_size", "candidates",
                     "val_size"):
            _at_least(f"rlprompt.{name}", getattr(self, name), 1)
        _at_least("rlprompt.prompts_per_step", self.prompts_per_step, 2)  # z-scores compare prompts
        for name in ("fluent_top_k", "top_k"):
            _at_least(f"rlprompt.{name}", getattr(self, name), 0)
        if self.grad_clip < 0:
            raise ConfigKeyError("rlprompt.grad_clip", f"rlprompt.grad_clip must be >= 0, got {self.grad_clip}")
        positive("rlprompt", self, "reward_scale", "lr")
        if self.target_rate is not None and not 0 <= self.target_rate <= 1:
            raise ConfigKeyError("rlprompt.target_rate",
                                 f"rlprompt.target_rate must be in [0, 1], got {self.target_rate}")

    def polyak_rate(self) -> float:
        """``target_rate``, or when unset the rate that moves the target as far over ``steps`` as the original's
        0.001 does over its 12,000 steps (``1 - (1 - rate) ** steps``: all but e^-12 of the way, after a
        lag of 1/12 of the run); at most 1 (then the target is the policy as it stood before each step)."""
        if self.target_rate is not None:
            return self.target_rate
        return min(1.0, RLPROMPT_TARGET_MOVES / self.steps)


_MARK = "\x00RLPROMPT\x00"


# ---- the loss -----------------------------------------------------------------------------------
def sql_loss(logits: torch.Tensor, target_logits: torch.Tensor, actions: torch.Tensor,
             rewards: torch.Tensor) -> torch.Tensor:
    """Soft Q-learning loss with a sparse (final-step) reward, RLPrompt's ``v2_v2r_v3_v3r`` without reversal.

    ``logits`` [B, T, V]: the policy's Q-values at each of the T prompt positions; ``target_logits`` [B, T, V]:
    the target network's; ``actions`` [B, T]: the sampled tokens; ``rewards`` [B]: each prompt's reward.
    With ``V_t = logsumexp Q_t``, ``A_t = Q_t(a_t) - V_t`` (= log pi(a_t | s_t)) and the target network's
    ``V'_t`` (no gradient):

        single-step (v2):  L2 = sum_t (A_t - Â_t)^2,   Â_t = V'_{t+1} - V'_t  (t < T),   Â_T = r - V'_T
        multi-step (v3):   L3 = sum_t (sum_{s>=t} A_s - (r - V'_t))^2

    and the loss is ``mean over the batch of (L2 + L3) / 2``. Both vanish when the policy's soft Q-values
    are consistent with the reward: ``Q_t(a_t) = V'_{t+1}`` and ``Q_T(a_T) = r`` (the path consistency of
    soft Q-learning with the target network's values).
    """
    q = logits.gather(-1, actions.unsqueeze(-1)).squeeze(-1)  # [B, T]
    adv = q - logits.logsumexp(-1)  # A_t
    v_target = target_logits.detach().logsumexp(-1)  # V'_t
    r = rewards.to(adv.dtype)
    step_target = torch.cat([v_target[:, 1:], r[:, None]], dim=1) - v_target  # Â_t
    single = (adv - step_target).pow(2).sum(-1)
    to_go = adv.flip(-1).cumsum(-1).flip(-1)  # sum_{s>=t} A_s
    multi = (to_go - (r[:, None] - v_target)).pow(2).sum(-1)
    return ((single + multi) / 2).mean()


@torch.no_grad()
def polyak_update(target: nn.Module, source: nn.Module, rate: float) -> None:
    """``target <- (1 - rate) target + rate source``, parameter by parameter."""
    for p_, p in zip(target.parameters(), source.parameters(), strict=True):
        p_.mul_(1 - rate).add_(p, alpha=rate)


def zscore_per_query(scores: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """``scores`` [prompts, queries] -> per-prompt rewards [prompts]: each query's scores are z-scored across the
    prompts (the paper's input-specific z-score), then averaged over the queries."""
    z = (scores - scores.mean(0, keepdim=True)) / (scores.std(0, unbiased=False, keepdim=True) + eps)
    return z.mean(1)


# ---- the policy ---------------------------------------------------------------------------------
class PromptPolicy(nn.Module):
    """M (frozen) + a trainable MLP on its last hidden state; the frozen output head turns it into Q-values."""

    def __init__(self, model, tokenizer, context: str, hidden_size: int, fluent_top_k: int = 0):
        super().__init__()
        self.lm = [model]  # in a list: not a submodule, so parameters() and copies hold the MLP only
        self.context = tokenizer(context, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        if self.context.numel() == 0:
            raise MetatunerError("rlprompt's policy context is empty; the tokenizer has no chat template and no "
                                 "EOS/BOS token to start from (use rlprompt.use=append)")
        dim = model.config.hidden_size
        self.mlp = nn.Sequential(nn.Linear(dim, hidden_size), nn.ReLU(), nn.Linear(hidden_size, dim))
        for m in self.mlp:  # the original's near-zero init: Q-values start (almost) uniform
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight, gain=1e-4)
                nn.init.constant_(m.bias, -1e-4)
        self.mlp.to(model.device, torch.float32)
        self.fluent_top_k = fluent_top_k
        vocab = model.get_output_embeddings().weight.shape[0]
        self.banned = torch.tensor([i for i in tokenizer.all_special_ids if i < vocab], dtype=torch.long)

    @property
    def model(self):
        return self.lm[0]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model.get_output_embeddings()
        bias = out.bias.detach().float() if getattr(out, "bias", None) is not None else None
        return F.linear(x, out.weight.detach().float(), bias)

    def q_values(self, h: torch.Tensor, mlp: nn.Module | None = None) -> torch.Tensor:
        """Q(s, .) = head(mlp(h)), with disallowed tokens (special ones; outside M's top-k when fluent) at -inf."""
        q = self.head((mlp if mlp is not None else self.mlp)(h))
        with torch.no_grad():
            banned = torch.zeros_like(q, dtype=torch.bool)
            banned[..., self.banned.to(q.device)] = True
            if self.fluent_top_k:
                lm = self.head(h).masked_fill(banned, float("-inf"))
                kth = lm.topk(min(self.fluent_top_k, lm.shape[-1]), dim=-1).values[..., -1:]
                banned |= lm < kth
        return q.masked_fill(banned, float("-inf"))

    @torch.no_grad()
    def rollout(self, n: int, length: int, greedy: bool = False, top_k: int = 0,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` prompts of ``length`` tokens: ``(ids [n, L], states [n, L, d])``, the states each token was
        chosen in (what the loss recomputes Q-values from)."""
        from transformers import DynamicCache

        decoder, device = self.model.get_decoder(), self.model.device
        ids = torch.zeros(n, 0, dtype=torch.long, device=device)
        if n == 0:
            return ids, torch.zeros(0, length, self.model.config.hidden_size, device=device)
        # the context is the same for every row: prefilled once, its KV cache shared by the n rows
        cache = DynamicCache(config=self.model.config)
        out = decoder(input_ids=self.context[None].to(device), cache=cache, use_cache=True)
        cache = out.cache
        cache.batch_repeat_interleave(n)
        h = out[0][:, -1].float().expand(n, -1)
        states = []
        for t in range(length):
            q = self.q_values(h)
            if greedy:
                a = q.argmax(-1)
            else:
                if top_k:
                    kth = q.topk(min(top_k, q.shape[-1]), dim=-1).values[:, -1:]
                    q = q.masked_fill(q < kth, float("-inf"))
                a = torch.multinomial(q.softmax(-1).cpu(), 1, generator=generator).squeeze(-1).to(device)
            states.append(h)
            ids = torch.cat([ids, a[:, None]], dim=1)
            if t + 1 < length:
                out = decoder(input_ids=a[:, None], cache=cache, use_cache=True)
                cache, h = out.cache, out[0][:, -1].float()
        count_generated(n * length)
        return ids, torch.stack(states, dim=1)


def policy_context(tokenizer, task: Task, use: str) -> str:
    """The fixed text the policy continues: the chat template's opening of the instruction (the system turn),
    followed by p~ when the prompt is appended to it; without a chat template, p~ or the EOS/BOS token."""
    rendered = render_chat(tokenizer, [{"role": "system", "content": _MARK}, {"role": "user", "content": "?"}])
    opening = rendered.split(_MARK)[0] if tokenizer.chat_template else ""
    if not opening and use == "replace":
        opening = tokenizer.eos_token or tokenizer.bos_token or ""
    return opening + (task.instruction if use == "append" else "")


def instruction_text(tokenizer, task: Task, ids: list[int], use: str) -> str:
    prompt = tokenizer.decode(ids, skip_special_tokens=True)
    return (task.instruction + prompt if use == "append" else prompt).strip()


# ---- rewards ------------------------------------------------------------------------------------
def query_scores(model, tokenizer, task: Task, instructions: list[str], queries: list[Example],
                 kind: str, max_new_tokens: int | None = None) -> torch.Tensor:
    """[prompts, queries] raw rewards: the gold target's mean log-probability, or the primary metric."""
    rows = [(i, ex) for i in instructions for ex in queries]
    rendered = [render_chat(tokenizer, task.messages(i, ex)) for i, ex in rows]
    if kind == "likelihood":
        values = continuation_logprobs(model, tokenizer, rendered, [ex.target for _, ex in rows])
    else:
        gens = generate(model, tokenizer, rendered, max_new_tokens or task.max_new_tokens, task.stop)
        values = [task.grade(g.text, ex)[1][task.primary_metric] for g, (_, ex) in zip(gens, rows)]
    return torch.tensor(values, dtype=torch.float32).view(len(instructions), len(queries))


def select_on_validation(candidates: list[str], score: Callable[[str], float]) -> list[tuple[str, float]]:
    """Scores each distinct candidate; returns ``[(instruction, score)]``, best first (ties: the earlier)."""
    scored = [(c, score(c)) for c in dict.fromkeys(candidates)]
    return sorted(scored, key=lambda cs: -cs[1])


class RLPromptPredictor(LMPredictor):
    """M unchanged, answering with the learned instruction; ``describe`` adds the prompt and its training."""

    def __init__(self, model, tokenizer, instruction: str, training: dict[str, Any]):
        super().__init__(model, tokenizer, instruction, name="rlprompt")
        self.training = training

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "training": self.training}


@METHODS.register("rlprompt")
class RLPrompt(Method):
    """RLPrompt by soft Q-learning (config: ``rlprompt.*``, else :class:`RLPromptConfig` defaults)."""

    needs_training = True
    config_class = RLPromptConfig

    def __init__(self, model, tokenizer, config: Any = None, run_dir=None,
                 scorer: Callable[[str, list[Example]], float] | None = None):
        super().__init__(model, tokenizer, config, run_dir)
        #: ``scorer(instruction, examples) -> primary metric`` for the validation choice (default: the harness)
        self.scorer = scorer
        self.progress = True  # the training progress bar (stderr)

    def cfg(self) -> RLPromptConfig:
        return self.method_config

    def budget(self) -> int:
        return self.cfg().steps

    def _score(self, task: Task, instruction: str, examples: list[Example]) -> float:
        if self.scorer is not None:
            return self.scorer(instruction, examples)
        from metatuner.methods.opro import score_predictor

        return score_predictor(LMPredictor(self.model, self.tokenizer, instruction), task, examples, self.config)

    def fit(self, task: Task, train: list[Example], val: list[Example]) -> RLPromptPredictor:
        cfg = self.cfg()
        if not train:
            raise MetatunerError(f"rlprompt needs training items of task {task.name!r} to compute rewards on")
        seed = getattr(self.config, "seed", 0)
        torch.manual_seed(seed)
        rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
        model, tok = self.model, self.tokenizer
        policy = PromptPolicy(model, tok, policy_context(tok, task, cfg.use), cfg.hidden_size, cfg.fluent_top_k)
        target = copy.deepcopy(policy.mlp).requires_grad_(False)
        self.trainable_params = count_trainable(policy.mlp)
        opt = torch.optim.Adam(policy.mlp.parameters(), lr=cfg.lr)
        sched = make_scheduler(opt, getattr(self.config, "train", None) or TrainConfig(), cfg.steps)
        text = lambda ids: instruction_text(tok, task, ids, cfg.use)  # noqa: E731
        budget = getattr(getattr(self.config, "eval", None), "max_new_tokens", None) or task.max_new_tokens

        def greedy_ids() -> list[int]:
            return policy.rollout(1, cfg.prompt_length, greedy=True)[0][0].tolist()

        def greedy() -> str:
            return text(greedy_ids())

        now = lambda step: lambda: RLPromptPredictor(model, tok, greedy(), {"steps": step})  # noqa: E731
        self.at_step(0, now(0))
        log: list[dict[str, Any]] = []
        rate = cfg.polyak_rate()
        for step in tqdm(range(1, cfg.steps + 1), desc="rlprompt (soft Q-learning)", disable=not self.progress):
            polyak_update(target, policy.mlp, rate)  # the target MLP moves before each step, as the original's
            ids, states = policy.rollout(cfg.prompts_per_step, cfg.prompt_length, top_k=cfg.top_k, generator=gen)
            prompts = [text(row) for row in ids.tolist()]
            queries = rng.sample(train, min(cfg.queries_per_step, len(train)))
            raw = query_scores(model, tok, task, prompts, queries, cfg.reward, budget)
            rewards = zscore_per_query(raw) * cfg.reward_scale
            loss = sql_loss(policy.q_values(states), policy.q_values(states, target), ids, rewards.to(states.device))
            opt.zero_grad()
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(policy.mlp.parameters(), cfg.grad_clip)
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            log.append({"step": step, "loss": loss.item(), "lr": lr, "prompts": prompts,
                        "raw_reward": raw.mean(1).tolist(), "reward": rewards.tolist()})
            self.at_step(step, now(step))

        sampled = policy.rollout(cfg.candidates - 1, cfg.prompt_length, top_k=cfg.top_k, generator=gen)[0].tolist() \
            if cfg.candidates > 1 else []
        prompt_ids = {}  # instruction -> its prompt tokens (the first candidate of each text)
        for row in [greedy_ids()] + sampled:
            prompt_ids.setdefault(text(row), row)
        held = val[: cfg.val_size]
        if held:
            ranked = select_on_validation(list(prompt_ids), lambda c: self._score(task, c, held))
        else:
            ranked = [(next(iter(prompt_ids)), None)]
        best, best_score = ranked[0]
        prompt = tok.decode(prompt_ids[best], skip_special_tokens=True)
        training = {"steps": cfg.steps, "use": cfg.use, "target_rate": rate, "prompt": prompt,
                    "prompt_ids": prompt_ids[best], "val_score": best_score, "val_items": len(held),
                    "candidates": [{"instruction": c, "val_score": s} for c, s in ranked],
                    "final_loss": log[-1]["loss"] if log else None, "trainable_params": self.trainable_params}
        if self.run_dir is not None:
            files.write_text(self.run_dir / "rlprompt.json",
                             json.dumps({"training": training, "log": log}, indent=2, ensure_ascii=False))
        return RLPromptPredictor(model, tok, best, training)
