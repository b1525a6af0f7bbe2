"""The DPO baseline: a LoRA on M trained with TRL's ``DPOTrainer`` on pairs of M's own sampled answers.

Pairs (on-policy, scored by the task itself): each of the first ``queries`` training queries is rendered
with the task's initial instruction p~ exactly as the harness renders it, M samples ``samples_per_query``
answers, and each answer is scored with ``task.grade(answer, example)``; full
marks count as correct. A query gives one pair per distinct incorrect answer, chosen = a distinct correct
answer (cycled), rejected = the incorrect one. With no correct sample the gold ``target`` is the chosen
answer (``gold_fallback``); with no incorrect sample there is nothing to reject and the query gives no
pair. Pairs are taken round-robin over queries up to ``max_pairs``, so a few queries cannot fill the budget.

Training (TRL, sigmoid loss), with pi = M + LoRA and pi_ref = the same model with the adapter disabled
(so no second model copy is kept):

    L = -log sigmoid(beta * [(log pi(y+|x) - log pi_ref(y+|x)) - (log pi(y-|x) - log pi_ref(y-|x))])

The learning rate ``dpo.lr`` follows ``train.lr_schedule`` with a warm-up of ``train.warmup_ratio`` of the
``dpo.steps`` optimizer steps, the one policy of every trained method (:mod:`metatuner.training.schedule`).

The data is plain text (prompt = the rendered chat input, so no chat template is applied twice); TRL
appends the EOS token to both answers. The LoRA is trained on a deep copy of M (PEFT injects its layers
in place) and merged into that copy, which the returned :class:`DPOPredictor` answers with, under p~.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from metatuner import files
from metatuner.config import TrainConfig
from metatuner.errors import MetatunerError
from metatuner.evaluation.generation import generate, render_chat
from metatuner.evaluation.predictors import LMPredictor
from metatuner.methods.base import METHODS, Method, count_trainable
from metatuner.options import ConfigKeyError, _at_least, non_negative, option, positive
from metatuner.tasks.base import Example, Task
from metatuner.training.schedule import hf_schedule


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
class Pair:
    id: str  # the query's example id
    prompt: str  # the rendered model input
    chosen: str
    rejected: str
    gold: bool  # chosen is the gold target (no sampled answer was correct)


def sample_answers(model, tokenizer, task: Task, prompts: list[str], cfg: DPOMethodConfig) -> list[list[str]]:
    """``cfg.samples_per_query`` sampled answers per prompt; rows are batched ``cfg.sample_batch_size`` at a time."""
    k, bs = cfg.samples_per_query, cfg.sample_batch_size
    rows = [p for p in prompts for _ in range(k)]
    budget = cfg.max_new_tokens or task.max_new_tokens
    texts: list[str] = []
    for b in range(0, len(rows), bs):
        gens = generate(model, tokenizer, rows[b : b + bs], budget, task.stop,
                        do_sample=True, temperature=cfg.temperature)
        texts += [g.text for g in gens]
    return [texts[i * k : (i + 1) * k] for i in range(len(prompts))]


def query_pairs(task: Task, ex: Example, prompt: str, answers: list[str], gold_fallback: bool) -> list[Pair]:
    """One query's pairs: each distinct incorrect answer against a correct one (the gold target if none)."""
    scores = {a: task.grade(a, ex)[1][task.primary_metric] for a in dict.fromkeys(answers)}
    correct = [a for a, s in scores.items() if s >= 1.0]
    wrong = [a for a, s in scores.items() if s < 1.0]
    gold = not correct
    if gold:
        if not gold_fallback:
            return []
        correct = [ex.target]
    return [Pair(ex.id, prompt, correct[i % len(correct)], r, gold) for i, r in enumerate(wrong)]


def preference_pairs(model, tokenizer, task: Task, examples: list[Example], cfg: DPOMethodConfig) -> list[Pair]:
    """Samples, scores and pairs answers for ``examples``; at most ``cfg.max_pairs``, round-robin over queries."""
    prompts = [render_chat(tokenizer, task.messages(task.instruction_for(ex), ex)) for ex in examples]
    answers = sample_answers(model, tokenizer, task, prompts, cfg)
    per_query = [query_pairs(task, ex, p, a, cfg.gold_fallback) for ex, p, a in zip(examples, prompts, answers)]
    rounds = itertools.zip_longest(*per_query)  # the 1st pair of every query, then the 2nd, ...
    return [p for rnd in rounds for p in rnd if p is not None][: cfg.max_pairs]


def train_dpo(model, tokenizer, pairs: list[Pair], cfg: DPOMethodConfig, lr_schedule: str, warmup_steps: int,
              seed: int = 0, out_dir: Path | None = None, on_step=None) -> tuple[Any, dict[str, Any]]:
    """Trains a LoRA on ``model`` (modified in place) with TRL; returns the merged model and its training record.

    ``lr_schedule`` (a ``transformers`` scheduler name) and ``warmup_steps`` (optimizer steps) come from
    :func:`metatuner.training.schedule.hf_schedule`, the policy every trained method shares. The record
    holds the final and mean loss and ``lrs``, the learning rate of each optimizer step as TRL applied it.
    Nothing is written unless ``out_dir`` is given; then TRL's output (the adapter at the last step) goes there.
    ``on_step(step, model)``, if given, is called after every optimizer step with the model as it is then
    (adapter active), for learning curves.
    """
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    # TRL turns activation (gradient) checkpointing on by default; transformers 5 renamed the option
    names = {f.name for f in fields(DPOConfig)}
    no_ckpt = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    data = Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs])
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.targets), lora_dropout=0.0,
                      task_type="CAUSAL_LM")
    # the Trainer always creates its output_dir, so without a run folder it gets a throwaway one
    where = contextlib.nullcontext(str(out_dir)) if out_dir is not None else tempfile.TemporaryDirectory()
    with where as output_dir:
        args = DPOConfig(
            output_dir=output_dir, max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, lr_scheduler_type=lr_schedule,
            warmup_steps=int(warmup_steps), beta=cfg.beta, max_length=cfg.max_length, seed=seed,
            # TRL defaults to bf16 autocast; the harness runs M in its own dtype
            bf16=False, fp16=False, **{no_ckpt: False}, use_cpu=model.device.type == "cpu",
            logging_steps=1, report_to="none", disable_tqdm=True,
            save_strategy="steps" if out_dir is not None else "no", save_steps=cfg.steps, save_only_model=True,
        )
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora,
                             callbacks=[_step_callback(on_step)] if on_step is not None else None)
        result = trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # one entry per optimizer step (logging_steps=1); the Trainer logs the rate the step was taken with
    lrs = {h["step"]: h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h}
    trained = count_trainable(trainer.model)
    merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload().eval()
    vars(merged).pop("forward", None)  # TRL's fused log-prob forward, patched onto the instance for its loss only
    return merged, {"final_loss": logged[-1], "mean_loss": result.training_loss, "lrs": [lrs[k] for k in sorted(lrs)],
                    "trainable_params": trained}


def _step_callback(on_step):
    """A ``TrainerCallback`` that hands the model (adapter active, in eval mode) to ``on_step`` after each step."""
    from transformers import TrainerCallback

    class StepCallback(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            model.eval()
            try:
                on_step(state.global_step, model)
            finally:
                model.train()

    return StepCallback()


def _fits(tokenizer, pair: Pair, max_length: int) -> bool:
    """Whether prompt + the longer answer fit: TRL cuts longer rows, which can leave a pair with no answer."""
    n = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    return n(pair.prompt) + max(n(pair.chosen), n(pair.rejected)) + 1 <= max_length


class DPOPredictor(LMPredictor):
    """M with the merged DPO LoRA answering under p~; ``describe`` adds how it was trained."""

    def __init__(self, model, tokenizer, instruction: str, training: dict[str, Any]):
        super().__init__(model, tokenizer, instruction, name="dpo")
        self.training = training

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "training": self.training}


@METHODS.register("dpo")
class DPO(Method):
    """LoRA DPO on pairs of M's own answers (config: ``dpo.*``, else :class:`DPOMethodConfig` defaults)."""

    needs_training = True
    config_class = DPOMethodConfig

    def fit(self, task: Task, train: list[Example], val: list[Example]) -> DPOPredictor:
        cfg = self.method_config
        queries = train[: cfg.queries]
        if not queries:
            raise MetatunerError("dpo needs training queries to sample answers for, but the train split is empty")
        pairs = preference_pairs(self.model, self.tokenizer, task, queries, cfg)
        if not pairs:
            raise MetatunerError(
                f"dpo built no preference pair from {len(queries)} queries x {cfg.samples_per_query} samples (a pair "
                f"needs an incorrect sample, and a correct one or dpo.gold_fallback=true); raise dpo.queries"
            )
        built = len(pairs)
        pairs = [p for p in pairs if _fits(self.tokenizer, p, cfg.max_length)]
        if not pairs:
            raise MetatunerError(
                f"all {built} dpo preference pairs are longer than dpo.max_length={cfg.max_length} tokens "
                f"(prompt + answer); raise dpo.max_length"
            )
        if self.run_dir is not None:
            files.write_text(self.run_dir / "dpo_pairs.jsonl",
                             "".join(json.dumps(asdict(p), ensure_ascii=False) + "\n" for p in pairs))
        out_dir = self.run_dir / "dpo" if self.run_dir is not None else None
        # the learning-rate policy of every trained method: train.lr_schedule and train.warmup_ratio
        schedule, warmup = hf_schedule(getattr(self.config, "train", None) or TrainConfig(), cfg.steps)
        self.at_step(0, lambda: DPOPredictor(self.model, self.tokenizer, task.instruction, {"steps": 0}))
        model, losses = train_dpo(
            copy.deepcopy(self.model), self.tokenizer, pairs, cfg, schedule, warmup, getattr(self.config, "seed", 0),
            out_dir, on_step=lambda step, now: self.at_step(
                step, lambda: DPOPredictor(now, self.tokenizer, task.instruction, {"steps": step})),
        )
        self.trainable_params = losses["trainable_params"]
        training = {"queries": len(queries), "pairs": len(pairs), "too_long": built - len(pairs),
                    "gold_fallback": sum(p.gold for p in pairs),
                    "steps": cfg.steps, "lr_schedule": schedule, "warmup_steps": warmup, **losses}
        return DPOPredictor(model, self.tokenizer, task.instruction, training)

    def budget(self) -> int:
        return self.method_config.steps
