"""Config sections of the baselines (``dpo.*``, ``bpo.*``, ``ppo.*``, ``grpo.*``, ``rlprompt.*``, ``opro.*``,
``bettertogether.*``); :class:`metatuner.config.RunConfig` holds one of each, and ``metatuner config`` lists them."""

from __future__ import annotations

from dataclasses import dataclass

from metatuner.errors import MetatunerError
from metatuner.options import ConfigKeyError, _at_least, non_negative, option, positive


@dataclass
class DPOMethodConfig:
    """The DPO baseline: self-sampled preference pairs, then LoRA DPO with TRL."""

    queries: int = option(64, "training queries to sample answers for (the first ones of the train split)")
    samples_per_query: int = option(4, "answers sampled per query (k)")
    temperature: float = option(1.0, "sampling temperature of the answers")
    max_new_tokens: int | None = option(None, "new-token budget of a sampled answer (unset: the task's)")
    sample_batch_size: int = option(32, "rows per sampling batch")
    max_pairs: int = option(128, "cap on preference pairs, taken round-robin over queries")
    gold_fallback: bool = option(True, "when no sample of a query is correct, the gold target is the chosen answer")
    steps: int = option(30, "DPO optimizer steps")
    batch_size: int = option(4, "pairs per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float = option(2e-4, "learning rate of the LoRA (schedule and warm-up: train.lr_schedule, train.warmup_ratio)")
    beta: float = option(0.1, "DPO beta: how strongly the policy is held to the reference (adapter-off) model")
    rank: int = option(8, "LoRA rank")
    alpha: float = option(16.0, "LoRA alpha (scale alpha / rank)")
    targets: list[str] = option(None, "LoRA target modules", factory=lambda: ["q_proj", "v_proj"])
    max_length: int = option(512, "truncate prompt + answer to this many tokens")

    def __post_init__(self):
        for name in ("queries", "samples_per_query", "max_new_tokens", "sample_batch_size", "max_pairs", "steps",
                     "batch_size", "grad_accum", "rank", "max_length"):
            _at_least(f"dpo.{name}", getattr(self, name), 1)
        positive("dpo", self, "temperature", "lr", "beta")
        non_negative("dpo", self, "alpha")


@dataclass
class BPOConfig:
    """The BPO baseline (bpo-selfpairs): a per-query prompt rewriter trained by SFT on pairs M's own reward picked."""

    model: str | None = option(
        None, "a released BPO rewriter (alias, hub id such as THUDM/BPO, or folder) used as it is, with BPO's "
        "prompt template and no training; unset: build pairs from M's own reward and train a LoRA rewriter"
    )
    queries: int = option(64, "training queries whose prompts are rewritten to build (original, improved) pairs")
    samples: int = option(4, "rewrites sampled per query; the best one is kept if it beats the original by margin")
    temperature: float = option(1.0, "sampling temperature of the rewrites")
    margin: float = option(
        0.05, "a rewrite becomes a pair only if it lowers M's mean gold-answer NLL by more than this (nats) "
        "against the original prompt of the same query"
    )
    max_new_tokens: int = option(64, "cap on the new tokens of a rewritten prompt (a cut one ends at its last sentence)")
    steps: int = option(12, "SFT optimizer steps of the rewriter on the kept pairs")
    batch_size: int = option(4, "pairs per optimizer step (and queries per rollout batch)")
    lr: float = option(1e-3, "learning rate of the rewriter's LoRA (schedule and warm-up: train.lr_schedule, train.warmup_ratio)")
    rank: int = option(8, "rank of the rewriter's LoRA")
    alpha: float = option(16.0, "LoRA alpha of the rewriter (scale alpha / rank)")
    targets: list[str] = option(None, "the rewriter's LoRA target modules", factory=lambda: ["q_proj", "v_proj"])
    gate: bool = option(True, "serve the rewritten prompts only if they score higher than the original ones on validation")
    gate_margin: float = option(
        0.0, "rewritten prompts are served only if they score more than this (primary metric, 0-1) above the originals on validation"
    )
    max_length: int = option(512, "truncate M's scoring inputs to this many tokens")

    def __post_init__(self):
        for name in ("queries", "samples", "max_new_tokens", "steps", "batch_size", "rank", "max_length"):
            _at_least(f"bpo.{name}", getattr(self, name), 1)
        positive("bpo", self, "temperature", "lr")
        non_negative("bpo", self, "alpha")
        if self.margin < 0 or self.gate_margin < 0:
            raise ConfigKeyError("bpo.margin", f"bpo.margin and bpo.gate_margin must be >= 0, got {self.margin} "
                                 f"and {self.gate_margin}")


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
