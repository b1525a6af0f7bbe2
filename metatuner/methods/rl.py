"""RL baselines: a LoRA on M fine-tuned on the task's own reward, with PPO (``ppo``) or GRPO (``grpo``).

**Reward** (both): an answer of M to a training query, rendered with the task's initial instruction p~
exactly as the harness renders it (``render_chat(tokenizer, task.messages(task.instruction_for(ex), ex))``),
is cut at the task's first stop string and graded with ``task.grade(answer, example)``: the reward is the
primary metric, in [0, 1]. ``format_bonus`` (default 0) adds a small shaping term when the answer is stated
in the asked format (the task's *strict* extraction found it), for models that are rarely right at first.

**GRPO** is TRL's ``GRPOTrainer`` on a PEFT LoRA of a deep copy of M: per optimizer step ``batch_size``
queries, ``group_size`` answers sampled for each (``num_generations``), advantages = reward minus its group
mean, divided by the group std (``scale_rewards=group``), the clipped objective, and a KL term to the
adapter-off model when ``beta`` > 0. Decoding is ``transformers.generate`` on CPU or GPU (no vLLM); bf16 and
activation checkpointing (TRL's defaults) are off, so M trains in its own dtype. Departures from the GRPO
paper (DeepSeekMath) are TRL's modern defaults, kept: ``loss_type=dapo`` (tokens averaged over the batch,
not per sequence; ``grpo.loss_type=grpo`` restores the paper's) and ``beta=0`` (no KL term, no reference
pass), one policy update per generation batch (``num_iterations=1``, so the ratio is 1 and clipping is
inert) and a LoRA instead of full weights. TRL's decoding knows no stop strings, so an answer may run past
the task's stop string; the reward cuts it there as the harness does, but the tokens after it are trained on.

**PPO** is written here on PEFT + torch, because the pinned TRL (1.16) no longer ships a PPO trainer
(``trl.experimental`` has no ``ppo``; the old ``PPOTrainer`` took a reward *model*, not a scoring function).
It follows the old ``PPOTrainer``'s algorithm and defaults (4 PPO epochs per rollout batch, clip 0.2, value
clip 0.2, vf_coef 0.1, kl_coef 0.05, gamma 1, lambda 0.95, temperature 0.7, whitened advantages, gradient
norm clipped at 1). Each rollout batch: ``batch_size`` training queries (shuffled, cycled), one answer
sampled each with M + LoRA; per-token log-probabilities of the policy and of the reference (the same model
with the adapter disabled: no second copy of M) and values; per-token rewards
``r_t = -kl_coef * (log pi(y_t) - log pi_ref(y_t))`` plus the task reward on the answer's last token;
GAE advantages and returns; then ``epochs`` x ``minibatches`` optimizer steps on

    L = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))
        + vf_coef * 0.5 * mean_t max((V_t - R_t)^2, (clip(V_t, V_old - c, V_old + c) - R_t)^2),

``rho_t = pi(y_t) / pi_old(y_t)``. Departures from TRL's PPOTrainer: the value function is a linear head
on the policy's last hidden state (sharing M + LoRA, as TRL's older ``AutoModelForCausalLMWithValueHead``
did) instead of a separate value model, the reward is the task's scorer instead of a reward model (no
``missing_eos_penalty``, no reward whitening), and the policy is a LoRA. The run stops after exactly
``steps`` optimizer steps, mid rollout batch if need be.

Both follow ``train.lr_schedule`` with a warm-up of ``train.warmup_ratio`` of their steps
(:mod:`metatuner.training.schedule`), merge the LoRA into the copy of M at the end and answer with it under
p~ (:class:`RLPredictor`, whose ``describe`` holds the ``training`` record).
"""

from __future__ import annotations

import contextlib
import copy
import random
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from metatuner.config import TrainConfig
from metatuner.errors import MetatunerError
from metatuner.evaluation.generation import count_generated, cut_at_stop, render_chat
from metatuner.evaluation.predictors import LMPredictor
from metatuner.methods.base import METHODS, Method, count_trainable
from metatuner.options import ConfigKeyError, _at_least, non_negative, option, positive
from metatuner.tasks.base import Example, Task
from metatuner.training.schedule import hf_schedule, make_scheduler


# ---- the reward shared by both methods -------------------------------------------------------------
@dataclass
class PPOMethodConfig:
    """The PPO baseline: rollouts of M + LoRA scored by the task, clipped PPO with a value head and a KL penalty."""

    steps: int = option(12, "PPO optimizer steps in all (each rollout batch gives epochs x minibatches of them)")
    batch_size: int = option(8, "queries per rollout batch (one sampled answer each)")
    epochs: int = option(4, "PPO epochs over each rollout batch")
    minibatches: int = option(1, "minibatches per epoch (batch_size must be divisible by it)")
    lr: float = option(1e-4, "learning rate of the LoRA and the value head (schedule: train.lr_schedule, train.warmup_ratio)")
    temperature: float = option(0.7, "sampling temperature of the rollouts (log-probabilities are taken at it too)")
    max_new_tokens: int | None = option(None, "new-token budget of a rollout answer (unset: the task's)")
    kl_coef: float = option(0.05, "per-token KL penalty to the reference (adapter-off) model, in the reward")
    cliprange: float = option(0.2, "PPO ratio clip epsilon: the ratio is held to [1 - eps, 1 + eps]")
    cliprange_value: float = option(0.2, "value clip: new values are held within this of the rollout's values")
    vf_coef: float = option(0.1, "weight of the value loss")
    gamma: float = option(1.0, "discount of GAE")
    lam: float = option(0.95, "lambda of GAE")
    format_bonus: float = option(0.0, "reward added when the answer is stated in the asked format (strict extraction)")
    rank: int = option(8, "LoRA rank")
    alpha: float = option(16.0, "LoRA alpha (scale alpha / rank)")
    targets: list[str] = option(None, "LoRA target modules", factory=lambda: ["q_proj", "v_proj"])

    def __post_init__(self):
        for name in ("steps", "batch_size", "epochs", "minibatches", "max_new_tokens", "rank"):
            _at_least(f"ppo.{name}", getattr(self, name), 1)
        positive("ppo", self, "lr", "temperature", "cliprange")
        non_negative("ppo", self, "kl_coef", "cliprange_value", "vf_coef", "format_bonus", "alpha")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigKeyError(f"ppo.{name}", f"ppo.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.batch_size % self.minibatches:
            raise ConfigKeyError("ppo.minibatches", f"ppo.batch_size={self.batch_size} must be divisible by "
                                 f"ppo.minibatches={self.minibatches}")


@dataclass
class GRPOMethodConfig:
    """The GRPO baseline: TRL's GRPOTrainer on a LoRA of M, rewarded by the task's scorer."""

    steps: int = option(12, "GRPO optimizer steps (one group of sampled answers per query per step)")
    batch_size: int = option(4, "queries per optimizer step")
    group_size: int = option(4, "answers sampled per query (TRL's num_generations); rewards are normalized in a group")
    lr: float = option(1e-4, "learning rate of the LoRA (schedule: train.lr_schedule, train.warmup_ratio)")
    temperature: float = option(1.0, "sampling temperature of the answers")
    max_new_tokens: int | None = option(None, "new-token budget of a sampled answer (unset: the task's)")
    beta: float = option(0.0, "KL coefficient to the reference (adapter-off) model; 0 (TRL's default) skips that pass")
    epsilon: float = option(0.2, "ratio clip epsilon")
    loss_type: str = option("dapo", "TRL loss aggregation over tokens (grpo: per-sequence mean, as in the paper)",
                            ("grpo", "dapo", "dr_grpo", "bnpo"))
    scale_rewards: str = option("group", "advantage = reward - group mean, divided by the std of: group, batch or none",
                                ("group", "batch", "none"))
    format_bonus: float = option(0.0, "reward added when the answer is stated in the asked format (strict extraction)")
    rank: int = option(8, "LoRA rank")
    alpha: float = option(16.0, "LoRA alpha (scale alpha / rank)")
    targets: list[str] = option(None, "LoRA target modules", factory=lambda: ["q_proj", "v_proj"])

    def __post_init__(self):
        for name in ("steps", "batch_size", "max_new_tokens", "rank"):
            _at_least(f"grpo.{name}", getattr(self, name), 1)
        _at_least("grpo.group_size", self.group_size, 2)
        positive("grpo", self, "lr", "temperature", "epsilon")
        non_negative("grpo", self, "beta", "format_bonus", "alpha")


def graded(task: Task, output: str, example: Example) -> tuple[float, bool]:
    """The task's primary score of ``output`` (cut at the task's stop strings, as the harness cuts answers)
    and whether the answer was stated in the asked format (the task's strict extraction found one)."""
    extracted, scores = task.grade(cut_at_stop(output, task.stop).strip(), example)
    return float(scores[task.primary_metric]), extracted.get("strict") is not None


def task_reward(task: Task, output: str, example: Example, format_bonus: float = 0.0) -> float:
    """The reward of ``output``: its primary score plus ``format_bonus`` when it is stated in the asked format."""
    score, formatted = graded(task, output, example)
    return score + (format_bonus if formatted else 0.0)


def prompt_for(tokenizer, task: Task, ex: Example) -> str:
    """The model input for ``ex`` exactly as the evaluation harness renders it (under p~)."""
    return render_chat(tokenizer, task.messages(task.instruction_for(ex), ex))


class RLPredictor(LMPredictor):
    """M with a merged RL-trained LoRA answering under p~; ``describe`` adds how it was trained."""

    def __init__(self, model, tokenizer, instruction: str, training: dict[str, Any], name: str):
        super().__init__(model, tokenizer, instruction, name=name)
        self.training = training

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "training": self.training}


def _lora(cfg) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.targets), lora_dropout=0.0,
                      task_type="CAUSAL_LM")


# ---- PPO: the pieces, each testable on hand-made tensors -------------------------------------------
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` shifted to mean 0 and scaled to variance 1 over the masked entries (0 elsewhere)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def kl_rewards(logp: torch.Tensor, ref_logp: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
               kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards ``[B, R]``: ``-kl_coef * (logp - ref_logp)`` on every answer token, plus the task
    score on each row's last answer token; and the per-token KL estimate ``logp - ref_logp`` (0 off the mask)."""
    kl = (logp - ref_logp) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(-1).long() - 1).clamp(min=0)  # answers are left-aligned: the last token of row i
    rewards[torch.arange(len(scores)), last] += scores.to(rewards.dtype)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimates and returns ``[B, R]`` of left-aligned answers (value 0 after the end)."""
    values = values * mask
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        nxt = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * nxt - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, adv + values


def ppo_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, vpred: torch.Tensor,
             old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange: float,
             cliprange_value: float, vf_coef: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped surrogate plus ``vf_coef`` times the clipped value loss, averaged over answer tokens."""
    ratio = torch.exp(logp - old_logp)
    pg = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - cliprange, 1 + cliprange))
    pg_loss = masked_mean(pg, mask)
    vclipped = old_values + torch.clamp(vpred - old_values, -cliprange_value, cliprange_value)
    vf = 0.5 * torch.max((vpred - returns) ** 2, (vclipped - returns) ** 2)
    vf_loss = masked_mean(vf, mask)
    clipfrac = masked_mean(((ratio - 1).abs() > cliprange).float(), mask)
    return pg_loss + vf_coef * vf_loss, {"pg_loss": pg_loss.item(), "vf_loss": vf_loss.item(),
                                          "clipfrac": clipfrac.item()}


def _end_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    return sorted(i for i in ids | {tokenizer.eos_token_id, tokenizer.pad_token_id} if i is not None)


@torch.no_grad()
def rollout(model, tokenizer, prompts: list[str], max_new_tokens: int, stop: tuple[str, ...], temperature: float):
    """Samples one answer per prompt: ``(ids [B, P + R], attention [B, P + R], P, answer mask [B, R], texts)``.

    The prompts are left-padded to ``P`` tokens, so answers start at ``P`` (left-aligned); an answer ends
    with its first EOS / pad token (included, as the harness counts it), and its text is cut at the stop
    strings. The tokens decoded are added to :func:`count_generated`.
    """
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False).to(model.device)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_p=1.0,
                         top_k=0, pad_token_id=tokenizer.pad_token_id, stop_strings=list(stop) or None,
                         tokenizer=tokenizer if stop else None)
    width = enc["input_ids"].shape[1]
    new = out[:, width:]
    is_end = torch.isin(new, torch.tensor(_end_ids(model, tokenizer), device=new.device))
    lengths = torch.where(is_end.any(-1), is_end.int().argmax(-1) + 1, torch.full_like(is_end[:, 0], new.shape[1],
                                                                                        dtype=torch.long))
    mask = (torch.arange(new.shape[1], device=new.device)[None] < lengths[:, None]).long()
    ids = torch.cat([enc["input_ids"], torch.where(mask.bool(), new, tokenizer.pad_token_id)], 1)
    attention = torch.cat([enc["attention_mask"], mask], 1)
    texts = [cut_at_stop(tokenizer.decode(row[:n], skip_special_tokens=True), stop).strip()
             for row, n in zip(new.tolist(), lengths.tolist())]
    count_generated(int(lengths.sum()))
    return ids, attention, width, mask.float(), texts


def answer_forward(model, head: nn.Module | None, ids: torch.Tensor, attention: torch.Tensor, width: int,
                   temperature: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probabilities ``[B, R]`` of the answer tokens (logits divided by ``temperature``, the
    distribution they were sampled from) and, with a value ``head``, the values ``[B, R]`` of the states
    they were sampled in."""
    positions = (attention.long().cumsum(-1) - 1).clamp(min=0)
    hidden = model.get_decoder()(input_ids=ids, attention_mask=attention, position_ids=positions)[0]
    states = hidden[:, width - 1 : -1]  # [B, R, H]: position t predicts token t + 1
    logits = model.get_output_embeddings()(states).float() / temperature
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, width:, None]).squeeze(-1)
    values = head(states.float()).squeeze(-1) if head is not None else None
    return logp, values


def train_ppo(peft_model, tokenizer, task: Task, queries: list[Example], cfg: PPOMethodConfig, train_cfg,
              seed: int = 0, on_step: Callable[[int], None] | None = None, progress: bool = True) -> dict[str, Any]:
    """Runs ``cfg.steps`` PPO optimizer steps on ``peft_model`` (LoRA layers trainable) in place; returns the
    training record. ``on_step(step)`` is called after every optimizer step."""
    from tqdm.auto import tqdm

    lm = peft_model.get_base_model()  # M with the LoRA layers injected; adapter on unless disabled
    lm.eval()  # no dropout anywhere (the LoRA has none): the rollout and update passes see the same model
    head = nn.Linear(lm.config.hidden_size, 1).to(lm.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    params = [p for p in peft_model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    scheduler = make_scheduler(optimizer, train_cfg, cfg.steps)
    budget = cfg.max_new_tokens or task.max_new_tokens
    rng = random.Random(seed)
    order: list[Example] = []
    record: dict[str, list] = {"reward": [], "score": [], "kl": [], "answer_tokens": [], "loss": [], "pg_loss": [],
                               "vf_loss": [], "clipfrac": [], "lrs": []}
    step = 0
    with tqdm(total=cfg.steps, desc="ppo", unit="step", disable=not progress) as bar:
        while step < cfg.steps:
            while len(order) < cfg.batch_size:  # shuffled passes over the queries
                order += rng.sample(queries, len(queries))
            batch, order = order[: cfg.batch_size], order[cfg.batch_size :]
            ids, attention, width, mask, texts = rollout(lm, tokenizer, [prompt_for(tokenizer, task, ex) for ex in batch],
                                                         budget, task.stop, cfg.temperature)
            grades = [graded(task, t, ex) for t, ex in zip(texts, batch)]
            scores = torch.tensor([s + (cfg.format_bonus if f else 0.0) for s, f in grades], device=lm.device)
            with torch.no_grad():
                old_logp, old_values = answer_forward(lm, head, ids, attention, width, cfg.temperature)
                with peft_model.disable_adapter():
                    ref_logp, _ = answer_forward(lm, None, ids, attention, width, cfg.temperature)
                rewards, kl = kl_rewards(old_logp, ref_logp, scores, mask, cfg.kl_coef)
                adv, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
                adv = masked_whiten(adv, mask)
            record["reward"].append(scores.mean().item())
            record["score"].append(sum(s for s, _ in grades) / len(grades))
            record["kl"].append(kl.sum(-1).mean().item())
            record["answer_tokens"].append(mask.sum(-1).mean().item())
            size = cfg.batch_size // cfg.minibatches
            for _ in range(cfg.epochs):
                perm = torch.randperm(cfg.batch_size, generator=torch.Generator().manual_seed(rng.getrandbits(31)))
                for mb in perm.split(size):
                    if step >= cfg.steps:
                        break
                    logp, vpred = answer_forward(lm, head, ids[mb], attention[mb], width, cfg.temperature)
                    loss, stats = ppo_loss(logp, old_logp[mb], adv[mb], vpred, old_values[mb], returns[mb], mask[mb],
                                           cfg.cliprange, cfg.cliprange_value, cfg.vf_coef)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    record["lrs"].append(optimizer.param_groups[0]["lr"])
                    optimizer.step()
                    scheduler.step()
                    step += 1
                    record["loss"].append(loss.item())
                    for k, v in stats.items():
                        record[k].append(v)
                    bar.update(1)
                    bar.set_postfix(reward=f"{record['reward'][-1]:.3f}", kl=f"{record['kl'][-1]:.3f}")
                    if on_step is not None:
                        on_step(step)
    return {"rollouts": len(record["reward"]), "mean_reward": sum(record["reward"]) / len(record["reward"]),
            "final_loss": record["loss"][-1], **record}


@METHODS.register("ppo")
class PPO(Method):
    """LoRA PPO on the task's reward, written on PEFT + torch (config: ``ppo.*``, see the module docstring)."""

    needs_training = True
    config_class = PPOMethodConfig

    def fit(self, task: Task, train: list[Example], val: list[Example]) -> RLPredictor:
        from peft import get_peft_model

        cfg = self.method_config
        if not train:
            raise MetatunerError("ppo needs training queries to roll out, but the train split is empty")
        train_cfg = getattr(self.config, "train", None) or TrainConfig()
        schedule, warmup = hf_schedule(train_cfg, cfg.steps)
        seed = getattr(self.config, "seed", 0)
        self.at_step(0, lambda: RLPredictor(self.model, self.tokenizer, task.instruction, {"steps": 0}, "ppo"))
        torch.manual_seed(seed)  # the LoRA's initialization and the sampling
        peft_model = get_peft_model(copy.deepcopy(self.model), _lora(cfg))
        lm = peft_model.get_base_model()
        record = train_ppo(peft_model, self.tokenizer, task, train, cfg, train_cfg, seed, on_step=lambda step: self.at_step(
            step, lambda: RLPredictor(lm, self.tokenizer, task.instruction, {"steps": step}, "ppo")))
        self.trainable_params = count_trainable(peft_model) + lm.config.hidden_size + 1  # + the value head
        merged = peft_model.merge_and_unload().eval().requires_grad_(False)
        training = {"queries": len(train), "steps": cfg.steps, "lr_schedule": schedule, "warmup_steps": warmup,
                    **record}
        return RLPredictor(merged, self.tokenizer, task.instruction, training, "ppo")

    def budget(self) -> int:
        return self.method_config.steps


# ---- GRPO: TRL's trainer with the task as the reward function ---------------------------------------
def grpo_reward(task: Task, examples: list[Example], format_bonus: float = 0.0):
    """A TRL reward function: grades each completion against its query's example (the dataset's
    ``example_index`` column) and adds the completion's tokens to :func:`count_generated`."""

    def task_score(prompts, completions, completion_ids=None, example_index=None, **kwargs) -> list[float]:
        if completion_ids is not None:
            count_generated(sum(len(ids) for ids in completion_ids))
        return [task_reward(task, c if isinstance(c, str) else c[-1]["content"], examples[i], format_bonus)
                for c, i in zip(completions, example_index)]

    return task_score


def train_grpo(model, tokenizer, task: Task, queries: list[Example], cfg: GRPOMethodConfig, lr_schedule: str,
               warmup_steps: int, seed: int = 0, out_dir: Path | None = None, on_step=None,
               progress: bool = True) -> tuple[Any, dict[str, Any], int]:
    """Trains a LoRA on ``model`` (modified in place) with TRL's GRPOTrainer; returns the merged model, its
    training record and the trainable parameter count. ``on_step(step, model)`` as in :func:`train_dpo`."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from metatuner.methods.dpo import _step_callback

    names = {f.name for f in fields(GRPOConfig)}
    no_ckpt = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    data = Dataset.from_list([{"prompt": trl_prompt(tokenizer, prompt_for(tokenizer, task, ex)), "example_index": i}
                              for i, ex in enumerate(queries)])
    where = contextlib.nullcontext(str(out_dir)) if out_dir is not None else tempfile.TemporaryDirectory()
    callbacks = [_progress_callback(cfg.steps, progress)]
    if on_step is not None:
        callbacks.append(_step_callback(on_step))
    with where as output_dir:
        args = GRPOConfig(
            output_dir=output_dir, max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size * cfg.group_size,
            gradient_accumulation_steps=1, num_generations=cfg.group_size, learning_rate=cfg.lr,
            lr_scheduler_type=lr_schedule, warmup_steps=int(warmup_steps), seed=seed,
            max_completion_length=cfg.max_new_tokens or task.max_new_tokens, temperature=cfg.temperature,
            beta=cfg.beta, epsilon=cfg.epsilon, loss_type=cfg.loss_type, scale_rewards=cfg.scale_rewards,
            use_vllm=False, disable_dropout=True,
            bf16=False, fp16=False, **{no_ckpt: False}, use_cpu=model.device.type == "cpu",
            logging_steps=1, report_to="none", disable_tqdm=True, log_completions=False,
            save_strategy="steps" if out_dir is not None else "no", save_steps=cfg.steps, save_only_model=True,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=grpo_reward(task, queries, cfg.format_bonus), args=args,
                              train_dataset=data, processing_class=tokenizer, peft_config=_lora(cfg),
                              callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)  # it prints every step's log dict; the bar shows the reward
        trainable = count_trainable(trainer.model)
        trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    record = {"rewards": [h["reward"] for h in logs], "reward_std": [h.get("reward_std") for h in logs],
              "answer_tokens": [h.get("completions/mean_length") for h in logs],
              "loss": [h.get("loss") for h in logs], "lrs": [h.get("learning_rate") for h in logs]}
    if cfg.beta > 0:
        record["kl"] = [h.get("kl") for h in logs]
    record["mean_reward"] = sum(record["rewards"]) / max(1, len(record["rewards"]))
    merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload().eval().requires_grad_(False)
    vars(merged).pop("forward", None)  # anything TRL patched onto the instance for its loss only
    return merged, record, trainable


def trl_prompt(tokenizer, rendered: str) -> str:
    """``rendered`` as TRL must be given it to see the harness's tokens: TRL tokenizes a text prompt with the
    tokenizer's special tokens, so a BOS the tokenizer adds is dropped from the text when the chat template
    wrote one already."""
    bos = tokenizer.bos_token
    adds = tokenizer("x")["input_ids"] != tokenizer("x", add_special_tokens=False)["input_ids"]
    return rendered[len(bos):] if adds and bos and rendered.startswith(bos) else rendered


def _progress_callback(steps: int, progress: bool):
    """A ``TrainerCallback`` showing a tqdm bar of optimizer steps (the Trainer's own bar prints every log)."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=steps, desc="grpo", unit="step", disable=not progress)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                self.bar.set_postfix(reward=f"{logs['reward']:.3f}")

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(1)

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return Progress()


@METHODS.register("grpo")
class GRPO(Method):
    """LoRA GRPO on the task's reward with TRL's GRPOTrainer (config: ``grpo.*``, see the module docstring)."""

    needs_training = True
    config_class = GRPOMethodConfig

    def fit(self, task: Task, train: list[Example], val: list[Example]) -> RLPredictor:
        cfg = self.method_config
        if not train:
            raise MetatunerError("grpo needs training queries to sample answers for, but the train split is empty")
        schedule, warmup = hf_schedule(getattr(self.config, "train", None) or TrainConfig(), cfg.steps)
        out_dir = self.run_dir / "grpo" if self.run_dir is not None else None
        self.at_step(0, lambda: RLPredictor(self.model, self.tokenizer, task.instruction, {"steps": 0}, "grpo"))
        model, record, self.trainable_params = train_grpo(
            copy.deepcopy(self.model), self.tokenizer, task, train, cfg, schedule, warmup,
            getattr(self.config, "seed", 0), out_dir, on_step=lambda step, now: self.at_step(
                step, lambda: RLPredictor(now, self.tokenizer, task.instruction, {"steps": step}, "grpo")),
        )
        training = {"queries": len(train), "steps": cfg.steps, "group_size": cfg.group_size,
                    "lr_schedule": schedule, "warmup_steps": warmup, **record}
        return RLPredictor(model, self.tokenizer, task.instruction, training, "grpo")

    def budget(self) -> int:
        return self.method_config.steps
