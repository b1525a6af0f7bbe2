"""BPO (Cheng et al., 2023, "Black-Box Prompt Optimization: Aligning Large Language Models without Model
Training") as the ``bpo-selfpairs`` baseline: a per-query prompt rewriter R, trained by SFT on (original
prompt, improved prompt) pairs; M's weights never change.

Pairs (BPO's recipe, with M's own reward instead of human preferences): for ``bpo.queries`` training
queries (a seeded draw), M with R's adapter (zero-initialised, so at first M itself) samples ``bpo.samples``
rewrites of the user's prompt (the query) from a BPO-style meta-prompt (:data:`metatuner.prompts.BPO`:
clearer, more specific, same meaning; the task's instruction shown as context). Each rewrite is scored
by M's mean gold-answer NLL with the rewritten query in place of the original one (teacher forced, M
with no adapter), against the original query of the same query; the best rewrite is kept as a pair when
it lowers the NLL by more than ``bpo.margin`` nats. Rewrites that leak the gold answer
(:func:`metatuner.training.rollouts.leaks`) are never kept. This is MetaTuner's rejection-sampling warm-up
of G (:func:`~metatuner.training.rollouts.offer` filling an expert set, then SFT in the one supervised loop,
:class:`~metatuner.training.supervised.SupervisedLoop`), run on a rewriter (:class:`SelfRewriter`: a LoRA
on M's base that writes text) whose "prompt" is the user's query rather than the instruction.
When no pair is kept (a small M rarely writes a better query), nothing is trained and the original
prompts are served (``describe()["gate"] == "initial (no pair kept)"``, ``training.steps == 0``).

Training: SFT of R (a LoRA of rank ``bpo.rank`` on all layers of the same base as M, the project's
:class:`~metatuner.models.lora.LoRAModel`, so no second copy of M is kept) on the kept pairs only, for
``bpo.steps`` optimizer steps of ``bpo.batch_size`` pairs at ``bpo.lr`` under ``train.lr_schedule`` /
``train.warmup_ratio``.

Predictor: per query, R rewrites the query greedily (batched); M, adapter off, answers the task's messages
with the rewritten query (the task's instruction p~ stays the system turn). Validation gate: unless the
rewritten prompts score more than ``bpo.gate_margin`` above the original ones on validation, the original
prompts are served (``describe()["prompts"]``, with both scores).

``bpo.model=<alias, hub id or folder>`` uses a released rewriter (e.g. ``THUDM/BPO``) as it is, with the
released template (``[INST] ... {prompt} [/INST]``, no chat template) and no training; the gate applies.

Departures from the original method: BPO's pairs come from human preference data (good vs bad responses)
and an LLM (ChatGPT) that writes the improved prompts, and the rewriter is a separate 7B Llama-2-chat
fine-tuned in full; here the rewrites are sampled from M itself, judged by M's own likelihood of the gold
answer (a smooth, task-specific reward rather than preference), the rewriter is a LoRA on M's own base,
only the user's query is rewritten (the task's instruction, which fixes the answer format, stays the
system turn) and a validation gate may fall back to the original prompts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

from metatuner import files
from metatuner.config import GeneratorConfig, HypernetConfig, RunConfig
from metatuner.errors import MetatunerError
from metatuner.evaluation.generation import Generation, encode_pairs, generate, render_chat, token_logprobs
from metatuner.evaluation.predictors import LMPredictor
from metatuner.methods.base import METHODS, Method, count_trainable
from metatuner.models.lora import LoRAModel
from metatuner.models.metatuner import draw_like_construction
from metatuner.models.precision import autocast_dtype, enable_autocast, needs_loss_scaling
from metatuner.models.recompute import set_gradient_checkpointing
from metatuner.options import ConfigKeyError, _at_least, non_negative, option, positive
from metatuner.prompts import BPO, bpo_messages
from metatuner.tasks.base import Example, Task
from metatuner.tasks.leaks import states_answer
from metatuner.training.experts import ExpertSet
from metatuner.training.rollouts import offer
from metatuner.training.schedule import hf_schedule
from metatuner.training.stream import DataStream
from metatuner.training.supervised import SupervisedLoop

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


logger = logging.getLogger(__name__)

Rewrite = Callable[[Task, list[Example]], list[str]]


class SelfRewriter:
    """R: a LoRA (``dec``, rank ``bpo.rank``) on ``bpo.targets`` of every layer of M's own base, which rewrites
    the user's query from BPO's meta-prompt; M (adapter off) reads the task's messages with the rewritten
    query. It is the :class:`~metatuner.training.rollouts.Proposer` BPO's rollouts sample rewrites from, and
    :meth:`prompt_nll` is the loss of its SFT on the kept pairs.

    R's adapter starts from the values, and torch's RNGs move on as, when R was a MetaTuner with its prompt
    decoder only (no shared encoder): a seed gives the pairs and the training it gave then.
    """

    ADAPTER = "dec"

    def __init__(self, model, tokenizer, cfg: BPOConfig):
        self.actor, self.tokenizer, self.max_new_tokens = model, tokenizer, cfg.max_new_tokens
        self.lora = LoRAModel(model)
        cuda = [model.device.index or 0] if model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):  # the draws are made again just below, with the rest
            self.lora.add_adapter(self.ADAPTER, list(cfg.targets), range(self.lora.num_layers), cfg.rank, cfg.alpha)
        gen = GeneratorConfig(targets=list(cfg.targets), rank=cfg.rank, alpha=cfg.alpha, share_layers=0)
        draw_like_construction(model, gen, HypernetConfig(targets=list(cfg.targets)))

    def set_precision(self, autocast: str = "auto", gradient_checkpointing: bool = False) -> None:
        """Autocast and gradient checkpointing of the base's forward passes (``train.autocast``, ...)."""
        enable_autocast(self.actor, autocast_dtype(autocast, next(self.actor.parameters()).dtype))
        set_gradient_checkpointing(self.actor, self.lora, gradient_checkpointing)

    def parameters(self) -> list[torch.nn.Parameter]:
        """R's trainable tensors."""
        return list(self.lora.adapter_parameters(self.ADAPTER))

    def state(self) -> dict[str, torch.Tensor]:
        """R's tensors by name (``dec.<site>.A`` / ``.B``), for a checkpoint."""
        return {f"{self.ADAPTER}.{k}": v for k, v in self.lora.adapter_state(self.ADAPTER).items()}

    # ---- R: the rewriter -----------------------------------------------------------------------------
    def rewrite_texts(self, task: Task, examples: list[Example]) -> list[str]:
        """R's input per query: BPO's meta-prompt around the query, the task's instruction as context."""
        return [render_chat(self.tokenizer, bpo_messages(task.instruction_for(ex), ex.query)) for ex in examples]

    @torch.no_grad()
    def generate_outputs(self, task: Task, examples: list[Example], *, sample: bool = False, n: int = 1,
                         temperature: float = 1.0) -> list[Generation]:
        """R's raw rewrites, ``n`` per query (grouped by query): greedy unless ``sample``."""
        with self.lora.use((self.ADAPTER,)):
            return generate(self.actor, self.tokenizer, self.rewrite_texts(task, examples), self.max_new_tokens,
                            do_sample=sample, temperature=temperature, num_samples=n)

    def clean_output(self, gen: Generation) -> str:
        """A rewrite cut at the token cap ends at its last complete sentence (nothing usable without one)."""
        text = gen.text.strip()
        if gen.finished:
            return text
        end = max(text.rfind(c) for c in ".!?")
        return text[: end + 1].strip() if end >= 0 else ""

    def keep_initial_output(self, task: Task, example: Example) -> str:
        """The rewrite that means "keep the original": the query itself."""
        return example.query

    def compose(self, task: Task, example: Example, output: str) -> str:
        """The query M reads for a cleaned rewrite (the original one for an empty rewrite)."""
        return output or example.query

    def rewrite(self, task: Task, examples: list[Example]) -> list[str]:
        """R's greedy rewrite of each query (the query itself where R writes nothing usable)."""
        gens = self.generate_outputs(task, examples)
        return [self.compose(task, ex, self.clean_output(g)) for ex, g in zip(examples, gens)]

    def prompt_nll(self, task: Task, examples: list[Example], outputs: list[str]) -> torch.Tensor:
        """Per-query mean NLL of the rewrites ``outputs`` (plus EOS) under R, teacher forced: R's SFT loss."""
        eos = self.tokenizer.eos_token or ""
        batch = encode_pairs(self.tokenizer, self.rewrite_texts(task, examples), [o + eos for o in outputs],
                             self.actor.device)
        with self.lora.use((self.ADAPTER,)):
            return _mean_nll(self.actor, batch)

    # ---- M, adapter off ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def as_actor(self, factors=None) -> Iterator[None]:
        """Context in which the base is M: no adapter (BPO never changes M's weights)."""
        with self.lora.use(()):
            yield

    def actor_inputs(self, task: Task, examples: list[Example], prompts: list[str]) -> list[str]:
        """M's input per query: the task's messages with the (rewritten) query ``prompts[i]``."""
        return [render_chat(self.tokenizer, task.messages(task.instruction_for(ex), dataclasses.replace(ex, query=p)))
                for p, ex in zip(prompts, examples)]

    def answer_nll(self, task: Task, examples: list[Example], prompts: list[str], factors=None,
                   max_length: int = 512, groups: list[int] | None = None) -> torch.Tensor:
        """Per-row mean NLL of each gold target (plus EOS) under M reading the query ``prompts[i]`` (the
        rewritten query itself comes first, so rows share no prefix worth running once: ``groups`` is unused)."""
        eos = self.tokenizer.eos_token or ""
        batch = encode_pairs(self.tokenizer, self.actor_inputs(task, examples, prompts),
                             [ex.target + eos for ex in examples], self.actor.device, max_length)
        with self.as_actor(factors):
            return _mean_nll(self.actor, batch)


def _mean_nll(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[bs]`` mean token NLL of the labelled positions."""
    total, count = token_logprobs(model, batch)
    return -total / count.clamp(min=1)


class ReleasedRewriter:
    """A released BPO model used as it is: BPO's template around the query, greedy decoding."""

    def __init__(self, model, tokenizer, max_new_tokens: int):
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens

    @torch.no_grad()
    def rewrite(self, task: Task, examples: list[Example]) -> list[str]:
        texts = [BPO["released"].format(prompt=ex.query) for ex in examples]
        gens = generate(self.model, self.tokenizer, texts, self.max_new_tokens)
        return [g.text.strip() or ex.query for g, ex in zip(gens, examples)]


class BPOPredictor(LMPredictor):
    """M answering with each query rewritten by the rewriter (``prompts="rewritten"``) or as it is
    (``"initial"``, the gate's fallback); the instruction is the task's own either way. Rewrites are made
    once per batch; ``describe`` adds the gate's verdict and how the rewriter was trained."""

    def __init__(self, model, tokenizer, rewrite: Rewrite, prompts: str = "rewritten", name: str = "bpo-selfpairs",
                 details: dict[str, Any] | None = None):
        super().__init__(model, tokenizer, None, name=name)
        self.rewrite, self.prompts, self.details = rewrite, prompts, details or {}
        self._memo: tuple[tuple[str, ...], list[str]] | None = None

    def queries(self, task: Task, examples: list[Example]) -> list[str]:
        """The query M reads for each example."""
        if self.prompts != "rewritten":
            return [ex.query for ex in examples]
        ids = tuple(ex.id for ex in examples)
        if self._memo is None or self._memo[0] != ids:
            # a rewrite that states an answer the query does not is a guess M would copy: the query is read instead
            self._memo = (ids, [ex.query if states_answer(task, ex, q) and not states_answer(task, ex, ex.query) else q
                                for ex, q in zip(examples, self.rewrite(task, examples))])
        return self._memo[1]

    def _inputs(self, task: Task, examples: list[Example]) -> tuple[list[str], list[str]]:
        instructions = self.instructions(task, examples)
        rewritten = [dataclasses.replace(ex, query=q) for ex, q in zip(examples, self.queries(task, examples))]
        rendered = [render_chat(self.tokenizer, self.messages(task, i, ex)) for i, ex in zip(instructions, rewritten)]
        return instructions, rendered

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"prompts": self.prompts} | self.details


def kept_pairs(rewriter: SelfRewriter, task: Task, queries: list[Example], experts) -> list[dict[str, Any]]:
    """The (original, improved) pairs: queries whose expert is a rewrite that beat the original by the margin."""
    pairs = []
    for ex in queries:
        e = experts[ex.id] if ex.id in experts else None
        if e is not None and e.gain > 0 and e.output != rewriter.keep_initial_output(task, ex):
            pairs.append({"id": ex.id, "original": ex.query, "improved": e.output, "gain": e.gain})
    return pairs


@METHODS.register("bpo-selfpairs")
class BPOSelfPairs(Method):
    """BPO with pairs from M's own reward (config: ``bpo.*``, else :class:`BPOConfig` defaults)."""

    needs_training = True
    config_class = BPOConfig
    config_section = "bpo"

    @property
    def cfg(self) -> BPOConfig:
        return self.method_config

    def fit(self, task: Task, train: list[Example], val: list[Example]) -> BPOPredictor:
        if self.cfg.model is not None:
            return self.fit_released(task, val)
        return self.fit_selfpairs(task, train, val)

    # ---- the gate ------------------------------------------------------------------------------------
    def gated(self, task: Task, val: list[Example], rewrite: Rewrite, details: dict[str, Any]) -> BPOPredictor:
        """The predictor to serve: rewritten prompts only if :func:`~metatuner.evaluation.gate.gate_opens`."""
        from metatuner.evaluation.gate import gate_opens
        from metatuner.methods.opro import score_predictor

        cfg = self.cfg
        rewritten = BPOPredictor(self.model, self.tokenizer, rewrite, "rewritten", details=details)
        if not (cfg.gate and val):
            return _with(rewritten, gate="off" if not cfg.gate else "none (no validation items)")
        score = score_predictor(rewritten, task, val, self.config)
        initial = score_predictor(BPOPredictor(self.model, self.tokenizer, rewrite, "initial"), task, val, self.config)
        prompts = "rewritten" if gate_opens(score, initial, cfg.gate_margin) else "initial"
        return _with(BPOPredictor(self.model, self.tokenizer, rewrite, prompts, details=details),
                     gate=prompts, val_score_rewritten=score, val_score_initial=initial)

    # ---- a released rewriter -------------------------------------------------------------------------
    def fit_released(self, task: Task, val: list[Example]) -> BPOPredictor:
        from metatuner.models.loading import load_model

        mc = getattr(self.config, "model", None)
        model, tokenizer = load_model(self.cfg.model, mc.dtype if mc else "float32", mc.device if mc else "auto")
        rewriter = ReleasedRewriter(model, tokenizer, self.cfg.max_new_tokens)
        return self.gated(task, val, rewriter.rewrite, {"rewriter": self.cfg.model, "training": {"steps": 0}})

    # ---- bpo-selfpairs -------------------------------------------------------------------------------
    def run_config(self) -> RunConfig:
        """The run config the rewriter trains under: ``train.*`` (schedule, clipping, seeds) with BPO's budgets."""
        rc = self.config if isinstance(self.config, RunConfig) else RunConfig()
        cfg = self.cfg
        tc = dataclasses.replace(
            rc.train, steps=cfg.steps, batch_size=cfg.batch_size, grad_accum=1, rollouts=cfg.samples,
            temperature=cfg.temperature, reward="nll", expert_margin=cfg.margin, lr_decoder=cfg.lr,
            max_length=cfg.max_length, actor_warmup_steps=0, generator_warmup_queries=cfg.queries,
            generator_warmup_steps=cfg.steps,
        )
        return dataclasses.replace(rc, train=tc)

    def fit_selfpairs(self, task: Task, train: list[Example], val: list[Example]) -> BPOPredictor:
        cfg, rc = self.cfg, self.run_config()
        tc = rc.train
        if not train:
            raise MetatunerError(f"bpo-selfpairs needs training queries of task {task.name!r} to build pairs from")
        rewriter = self.rewriter = SelfRewriter(self.model, self.tokenizer, cfg)
        rewriter.set_precision(tc.autocast, tc.gradient_checkpointing)
        params = rewriter.parameters()
        self.trainable_params = count_trainable(torch.nn.ParameterList(params))
        loop = SupervisedLoop(tc, self.run_dir, device_type=self.model.device.type,
                              loss_scaling=needs_loss_scaling(self.model))
        loop.setup(cfg.steps, {"decoder": params})
        experts = ExpertSet(tc.expert_cap, tc.expert_margin)  # each query's best rewrite so far
        loop.save = lambda: loop.save_checkpoint(rewriter.state(), {"experts": experts.state()})
        details: dict[str, Any] = {"rewriter": "self-pairs LoRA"}
        now = lambda: self.gated(task, val, rewriter.rewrite, details)  # noqa: E731
        loop.on_step = lambda step: self.at_step(step, now)
        self.at_step(0, now)

        # pairs: rollouts of the rewriter (M itself at first) fill the expert set, as in G's warm-up
        by_id = {ex.id: ex for ex in train}
        queries = DataStream(train, rc.data.seed + 2).next(min(cfg.queries, len(train)))
        queries = list({ex.id: ex for ex in queries}.values())
        leaked = 0
        with tqdm(total=len(queries), desc="bpo pairs (rollouts)", disable=not loop.progress) as bar:
            for i in range(0, len(queries), cfg.batch_size):
                batch = queries[i : i + cfg.batch_size]
                r, _ = offer(experts, rewriter, task, batch, None, tc, loop.gather,
                             lambda qid: rewriter.keep_initial_output(task, by_id[qid]))
                leaked += r.leaked if r is not None else 0
                bar.update(len(batch))
                loop.stop_point()  # a SIGTERM between two rollout batches stops here
        pairs = kept_pairs(rewriter, task, queries, experts)
        if self.run_dir is not None:
            files.write_text(self.run_dir / "bpo_pairs.jsonl",
                             "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
        schedule, warmup = hf_schedule(tc, cfg.steps)
        details["training"] = {"queries": len(queries), "samples": cfg.samples, "pairs": len(pairs),
                               "leaked": leaked, "mean_gain": sum(p["gain"] for p in pairs) / max(1, len(pairs)),
                               "steps": cfg.steps if pairs else 0, "lr_schedule": schedule, "warmup_steps": warmup}
        loop.log({"phase": "bpo_pairs", "step": loop.step, **details["training"]})
        if not pairs:
            # nothing to fine-tune on (a small M rarely rewrites a query into a better one): the untrained
            # rewriter is M itself, which the pairs just showed does not help, so the original prompts are served
            logger.warning("bpo-selfpairs kept no pair from %d queries x %d rewrites (bpo.margin=%s); serving the "
                           "original prompts", len(queries), cfg.samples, cfg.margin)
            fallback = lambda: _with(  # noqa: E731
                BPOPredictor(self.model, self.tokenizer, rewriter.rewrite, "initial", details=details),
                gate="initial (no pair kept)")
            for step in range(1, cfg.steps + 1):  # the budget's steps, none taken: learning curves stay complete
                self.at_step(step, fallback)
            return fallback()
        improved = {p["id"]: p["improved"] for p in pairs}
        stream = DataStream([by_id[i] for i in improved], rc.data.seed + 3)

        def loss(batch: list[Example]) -> torch.Tensor:
            return rewriter.prompt_nll(task, batch, [improved[ex.id] for ex in batch]).mean()

        loop.run("bpo_rewriter", "rewriter_sft", cfg.steps, stream, loss)
        return now()

    def budget(self) -> int:
        return 0 if self.cfg.model is not None else self.cfg.steps


def _with(predictor: BPOPredictor, **details: Any) -> BPOPredictor:
    predictor.details = {**predictor.details, **details}
    return predictor
