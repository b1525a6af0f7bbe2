"""MetaTuner: the prompt generator G, the parameter generator F and the downstream model M together.

G and M are one causal LM with LoRA adapters (one copy of the frozen base weights in memory) unless G
is configured as a different checkpoint. G's adapters are split at layer ``k``:

- ``enc``         G's LoRA on layers ``[0, k)``: the shared meta encoder (``phi_s``);
- ``dec``         G's LoRA on layers ``[k, K)``: the private prompt decoder (``phi_p``);
- ``dec_frozen``  a frozen copy of ``dec`` (``phi_p'``), re-synchronised by the trainer;
- ``static``      M's static LoRA from the warm-up SFT (optional, frozen during joint training);
- per-row LoRA on M, written by F from the meta encoder's pooled layer-k state.

For a batch of queries: ``encode`` gives ``h [bs, d]``; ``factors(h)`` gives each row's LoRA;
``generate_outputs`` samples or decodes G's outputs and ``compose`` turns one into the prompt M reads
(``generator.mode``: ``rewrite`` = the output is the prompt; ``append`` = ``p~`` plus the output as a
hint; an output cut at the token cap is cut back to its last sentence or dropped); ``answer_nll``
scores gold answers under M with those prompts and factors; ``prompt_nll`` scores outputs under G
(the regularizer).

When warm-up SFT has given M a static LoRA, F's generated LoRA is a residual on top of it: F's B heads
start at zero, so right after the warm-up M is exactly the SFT model, and the static LoRA keeps
training on the task loss unless ``train.freeze_static``. ``serve_generated`` is the validation gate's
verdict: when False, inference answers with ``p~`` (and F's LoRA).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from metatuner.config import GeneratorConfig, HypernetConfig
from metatuner.errors import MetatunerError
from metatuner.evaluation.generation import (
    Generation, encode_pairs, generate, generate_rows, prefix_cache, render_chat, shared_prefix_length,
    token_logprobs,
)
from metatuner.models.hypernet import LoRAHypernet
from metatuner.models.lora import LoRALinear, LoRAModel, initial_a
from metatuner.models.precision import autocast_dtype, enable_autocast
from metatuner.models.recompute import gradient_checkpointing as is_checkpointed
from metatuner.models.recompute import set_gradient_checkpointing
from metatuner.prompts import generator_messages
from metatuner.tasks.base import Example, Task
from metatuner.tasks.leaks import states_answer

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


class _Stop(Exception):
    """Raised by a forward hook to end a forward pass early, once layer k's output is captured."""


def resolve_split(cfg: GeneratorConfig, num_layers: int, no_share: bool = False) -> int:
    """The meta encoder's depth k, from ``share_layers`` or ``share_ratio`` (0 when sharing is ablated)."""
    if no_share:
        return 0
    if cfg.share_layers is not None:
        if cfg.share_layers > num_layers:
            raise MetatunerError(
                f"generator.share_layers={cfg.share_layers} is beyond G's depth; allowed: 0..{num_layers}"
            )
        return cfg.share_layers
    return round(cfg.share_ratio * num_layers)


class MetaTuner(nn.Module):
    """Holds G's adapters and F; the base model(s) stay frozen. See the module docstring."""

    def __init__(
        self,
        actor,
        tokenizer,
        gen_cfg: GeneratorConfig,
        hyper_cfg: HypernetConfig,
        generator=None,
        gen_tokenizer=None,
        no_share: bool = False,
        use_hypernet: bool = True,
        use_prompt: bool = True,
    ):
        super().__init__()
        self.actor = actor
        self.generator = generator if generator is not None else actor
        self.tokenizer = tokenizer
        self.gen_tokenizer = gen_tokenizer or tokenizer
        self.gen_cfg, self.hyper_cfg = gen_cfg, hyper_cfg
        self.use_hypernet, self.use_prompt = use_hypernet, use_prompt
        self.m_lora = LoRAModel(self.actor)
        self.g_lora = self.m_lora if self.generator is self.actor else LoRAModel(self.generator)
        K = self.g_lora.num_layers
        self.k = resolve_split(gen_cfg, K, no_share)
        self.feature_layer = self.k if self.k > 0 else (gen_cfg.feature_layer or max(1, K // 4))
        if not 0 < self.feature_layer <= K:
            raise MetatunerError(f"generator.feature_layer must be in 1..{K}, got {self.feature_layer}")
        self.g_lora.add_adapter("enc", gen_cfg.targets, range(0, self.k), gen_cfg.rank, gen_cfg.alpha)
        self.g_lora.add_adapter("dec", gen_cfg.targets, range(self.k, K), gen_cfg.rank, gen_cfg.alpha)
        self.g_lora.add_adapter("dec_frozen", gen_cfg.targets, range(self.k, K), gen_cfg.rank, gen_cfg.alpha)
        self.g_lora.copy_adapter("dec", "dec_frozen")
        for p in self.g_lora.adapter_parameters("dec_frozen"):
            p.requires_grad_(False)

        layers = hyper_cfg.layers if hyper_cfg.layers is not None else range(self.m_lora.num_layers)
        bad = [i for i in layers if not 0 <= i < self.m_lora.num_layers]
        if bad:
            raise MetatunerError(f"hypernet.layers has {bad[0]}; allowed: 0..{self.m_lora.num_layers - 1}")
        self.sites = self.m_lora.select(hyper_cfg.targets, layers)
        for site in self.sites:
            self.m_lora.module(site)  # wrap now so the first forward pass finds every site
        shapes = {}
        for site in self.sites:
            mod = self.m_lora.module(site)
            shapes[site.kind] = (mod.in_features, mod.out_features)
        self.hypernet = LoRAHypernet(
            self.generator.config.hidden_size, self.sites, shapes, self.m_lora.num_layers,
            hyper_cfg.rank, hyper_cfg.hidden, hyper_cfg.emb_dim,
        ).to(self.actor.device)
        self.rows_scale = hyper_cfg.alpha / hyper_cfg.rank
        self.has_static = False
        self.serve_generated = True  # the validation gate's verdict (see the module docstring)
        self.prompt_branch_note: str | None = None  # "prompt branch retired at step N: ..." once it has

    # ---- parameter groups -----------------------------------------------------------------------
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by component: encoder (phi_s), decoder (phi_p), hypernet (phi_q), and M's
        static LoRA when there is one."""
        groups = {
            "encoder": list(self.g_lora.adapter_parameters("enc")),
            "decoder": list(self.g_lora.adapter_parameters("dec")),
            "hypernet": list(self.hypernet.parameters()),
        }
        if self.has_static:
            groups["static"] = list(self.m_lora.adapter_parameters("static"))
        return groups

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything learned (never the frozen base): G's adapters, the frozen copy, static LoRA, F."""
        state = {}
        for name in ("enc", "dec", "dec_frozen") + (("static",) if self.has_static else ()):
            state.update({f"{name}.{k}": v for k, v in self._lora_holding(name).adapter_state(name).items()})
        state.update({f"hypernet.{k}": v for k, v in self.hypernet.state_dict().items()})
        return state

    @torch.no_grad()
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        own = self.trainable_state()
        missing = sorted(set(own) - set(state))
        if missing:
            raise MetatunerError(f"checkpoint lacks {len(missing)} tensors (e.g. {missing[0]}); wrong config?")
        for k, v in own.items():
            v.copy_(state[k])

    def _lora_holding(self, adapter: str) -> LoRAModel:
        """The LoRAModel an adapter lives in: M's static one in M, the rest in G."""
        return self.m_lora if adapter == "static" else self.g_lora

    def add_static_adapter(self, rank: int, alpha: float) -> None:
        """A fresh static LoRA on M (warm-up SFT) on the same targets as the generated LoRA."""
        layers = sorted({s.layer for s in self.sites})
        self.m_lora.add_adapter("static", sorted({s.kind for s in self.sites}), layers, rank, alpha)
        self.has_static = True

    def retire_prompt_branch(self, note: str) -> None:
        """From now on G is never run: p~ is served and trained on (the prompt branch retired itself, ``note``
        says when and why; :mod:`metatuner.training.branch`)."""
        self.use_prompt = False
        self.serve_generated = False
        self.prompt_branch_note = note

    def set_precision(self, autocast: str = "auto", gradient_checkpointing: bool = False) -> None:
        """Mixed precision and gradient checkpointing for the base model(s) of G and M.

        Args:
            autocast: ``train.autocast``: forward passes run under ``torch.autocast`` in the dtype
                :func:`~metatuner.models.precision.autocast_dtype` picks (``auto``: on for a bf16 / fp16 base).
            gradient_checkpointing: ``train.gradient_checkpointing``: decoder blocks are recomputed in the
                backward pass (:mod:`metatuner.models.recompute`).

        A float32 base with the defaults is left exactly as it is. Calling it again replaces the setting.
        """
        bases = {id(self.actor): (self.actor, self.m_lora), id(self.generator): (self.generator, self.g_lora)}
        for model, lora in bases.values():
            enable_autocast(model, autocast_dtype(autocast, next(model.parameters()).dtype))
            set_gradient_checkpointing(model, lora, gradient_checkpointing)

    def sync_frozen_decoder(self) -> None:
        self.g_lora.copy_adapter("dec", "dec_frozen")

    # ---- G: meta encoder and prompt decoder --------------------------------------------------
    def rewrite_texts(self, task: Task, examples: list[Example]) -> list[str]:
        """G's input per query: ``p~`` and the query in the template of ``generator.mode``."""
        return [
            render_chat(self.gen_tokenizer, generator_messages(task.instruction_for(ex), ex.query, self.gen_cfg.mode))
            for ex in examples
        ]

    def rewrite_batch(self, task: Task, examples: list[Example]):
        """G's right-padded rewrite inputs and ``pool_mask [bs, T]``, the positions pooled into F's input:
        the query's own tokens (``generator.features=query``) or every non-padding one (``all``)."""
        tok = self.gen_tokenizer
        texts = self.rewrite_texts(task, examples)
        query_only = self.gen_cfg.features == "query"
        # right padding keeps positions identical to the unpadded rows
        enc = tok(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False,
                  return_offsets_mapping=query_only)
        pool_mask = enc["attention_mask"].clone()  # [bs, T]
        if query_only:
            # the template and p~ are the same for every query: pooling over them pushes F towards one static LoRA
            offsets = enc.pop("offset_mapping")  # [bs, T, 2] character spans
            for i, (text, ex) in enumerate(zip(texts, examples)):
                start = text.rfind(ex.query)
                if start >= 0 and ex.query:
                    inside = (offsets[i, :, 1] > start) & (offsets[i, :, 0] < start + len(ex.query))
                    pool_mask[i] &= inside.to(pool_mask.dtype)
        return enc.to(self.generator.device), pool_mask.to(self.generator.device)

    def encode(self, task: Task, examples: list[Example]) -> torch.Tensor:
        """The meta encoder's pooled layer-k state for each query's rewrite input: ``[bs, d]``.

        The forward pass stops right after layer k. With k = 0 (no sharing) F reads a frozen layer of the
        base model instead, with no gradient, so F and G share no trainable parameter.
        """
        enc, pool_mask = self.rewrite_batch(task, examples)
        ids, attention = enc["input_ids"], enc["attention_mask"]
        # causal attention: a pooled state depends on no later token, so nothing after the last pooled one is run
        positions = torch.arange(pool_mask.shape[1], device=pool_mask.device)
        end = int((pool_mask * positions).amax()) + 1 if pool_mask.any() else pool_mask.shape[1]
        ids, attention, pool_mask = ids[:, :end], attention[:, :end], pool_mask[:, :end]
        grad = torch.enable_grad() if self.k > 0 and torch.is_grad_enabled() else torch.no_grad()
        with grad, self.g_lora.use(("enc",) if self.k > 0 else ()):
            start = self._shared_prefix(ids, attention, pool_mask)
            states = self._run_to_feature_layer(ids, attention, start)  # [bs, T - start, d]
        pool_mask = pool_mask[:, start:]
        if self.gen_cfg.pooling == "last":
            positions = torch.arange(pool_mask.shape[1], device=pool_mask.device)
            last = (pool_mask * positions).argmax(1)  # the last pooled position of each row
            return states[torch.arange(states.shape[0]), last].float()
        mask = pool_mask.unsqueeze(-1).to(states.dtype)  # [bs, T, 1]
        return ((states * mask).sum(1) / mask.sum(1).clamp(min=1)).float()

    #: the fewest tokens that every rewrite input of a batch must share before :meth:`encode` runs them once
    MIN_SHARED_PREFIX = 8

    def _shared_prefix(self, ids: torch.Tensor, attention: torch.Tensor, pool_mask: torch.Tensor) -> int:
        """How many leading tokens every row has alike, none of them pooled (the template and p~ before the
        query): :meth:`encode` runs them for one row and hands their keys and values to all. 0 when that does
        not apply: one row, a short prefix, or a model whose cache is not a plain full-attention one
        (sliding windows) or whose blocks are recomputed in the backward pass (checkpointing drops caches)."""
        if ids.shape[0] < 2 or (torch.is_grad_enabled() and is_checkpointed(self.generator)):
            return 0
        alike = ((ids == ids[:1]) & (attention == 1) & (pool_mask == 0)).all(0)  # [T]
        start = int(alike.long().cumprod(0).sum())
        return start if start >= self.MIN_SHARED_PREFIX and start < ids.shape[1] else 0

    def _run_to_feature_layer(self, ids: torch.Tensor, attention: torch.Tensor, start: int) -> torch.Tensor:
        """G's hidden states after layer ``feature_layer`` at positions ``start:`` of right-padded ``ids``
        (in the caller's adapter and grad context). With ``start`` > 0 the first ``start`` tokens, alike in
        every row, run once, as one row whose keys and values every row then attends to."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        captured: list[torch.Tensor] = []
        layer = self.generator.get_decoder().layers[self.feature_layer - 1]  # the decoder's blocks, any family

        def hook(module, args, output):
            captured.append(output[0] if isinstance(output, tuple) else output)
            raise _Stop

        def run(**inputs) -> torch.Tensor:
            captured.clear()
            try:
                self.generator(**inputs)
            except _Stop:
                pass
            return captured[0]

        handle = layer.register_forward_hook(hook)
        try:
            cache = DynamicCache(config=self.generator.config) if start else None
            if cache is None or not all(type(c) is DynamicLayer for c in cache.layers):
                return run(input_ids=ids, attention_mask=attention, use_cache=False)[:, start:]
            run(input_ids=ids[:1, :start], attention_mask=attention[:1, :start], cache=cache, use_cache=True)
            cache.batch_repeat_interleave(ids.shape[0])  # layers past the feature layer were never run: left empty
            positions = torch.arange(start, ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
            return run(input_ids=ids[:, start:], attention_mask=attention, position_ids=positions, cache=cache,
                       use_cache=True)
        finally:
            handle.remove()

    @torch.no_grad()
    def generate_outputs(
        self, task: Task, examples: list[Example], *, sample: bool = False, n: int = 1,
        temperature: float = 1.0, frozen: bool = False,
    ) -> list[Generation]:
        """G's raw outputs for each query (``n`` per query, grouped by query): greedy unless ``sample``,
        with the trained prompt decoder or its frozen copy."""
        with self.g_lora.use(("enc", "dec_frozen" if frozen else "dec")):
            return generate(  # the n samples of a query share one prefill of its rewrite text
                self.generator, self.gen_tokenizer, self.rewrite_texts(task, examples), self.gen_cfg.max_prompt_tokens,
                do_sample=sample, temperature=temperature, num_samples=n,
            )

    @torch.no_grad()
    def generate_mixed(
        self, task: Task, sampled: list[Example], n: int, temperature: float, greedy: list[Example],
    ) -> tuple[list[Generation], list[Generation]]:
        """In one batched generate: ``n`` outputs per query of ``sampled`` from the trained prompt decoder
        (grouped by query), and the frozen copy's greedy output for each query of ``greedy``."""
        b, g = len(sampled), len(greedy)
        rows = [i for i in range(b) for _ in range(n)] + [b + j for j in range(g)]
        device = self.generator.device

        def stage(name: str, index: torch.Tensor | None = None):
            live = torch.tensor([1.0] * (b if name == "prefill" else b * n) + [0.0] * g, device=device)
            live = live if index is None else live.index_select(0, index)  # the prefill of some texts only
            return self.g_lora.use(("enc", "dec", "dec_frozen"), masks={"dec": live, "dec_frozen": 1 - live})

        gens = generate_rows(self.generator, self.gen_tokenizer, self.rewrite_texts(task, sampled + greedy), rows,
                             self.gen_cfg.max_prompt_tokens, greedy=[False] * (b * n) + [True] * g,
                             temperature=temperature, stage=stage, groups=[0] * b + [1] * g)
        return gens[: b * n], gens[b * n :]

    def keep_initial_output(self, task: Task, example: Example) -> str:
        """The output of G that means "keep p~": p~ itself in rewrite mode, no hint in append mode."""
        return task.instruction_for(example) if self.gen_cfg.mode == "rewrite" else ""

    def clean_output(self, gen: Generation) -> str:
        """An output as M will see it: one cut at the token cap ends at its last complete sentence
        (``generator.on_cap=cut``) or is dropped (``fallback``), which means p~."""
        text = gen.text.strip()
        if gen.finished:
            return text
        if self.gen_cfg.on_cap == "cut":
            end = max(text.rfind(c) for c in ".!?")
            return text[: end + 1].strip() if end >= 0 else ""
        return ""

    def compose(self, task: Task, example: Example, output: str) -> str:
        """The prompt M reads for a cleaned output of G: p~ for an empty output, and for one that states an
        answer (:func:`~metatuner.tasks.leaks.states_answer`), wherever the prompt is used."""
        initial = task.instruction_for(example)
        if not output or states_answer(task, example, output):
            return initial
        return output if self.gen_cfg.mode == "rewrite" else f"{initial} {output}"

    def generate_prompts(
        self, task: Task, examples: list[Example], *, sample: bool = False, n: int = 1,
        temperature: float = 1.0, frozen: bool = False,
    ) -> list[str]:
        """The prompt M reads for each query (``n`` per query, grouped by query)."""
        if not self.use_prompt:
            return [task.instruction_for(ex) for ex in examples for _ in range(n)]
        gens = self.generate_outputs(task, examples, sample=sample, n=n, temperature=temperature, frozen=frozen)
        reps = [ex for ex in examples for _ in range(n)]
        return [self.compose(task, ex, self.clean_output(g)) for g, ex in zip(gens, reps)]

    def prompt_nll(self, task: Task, examples: list[Example], outputs: list[str]) -> torch.Tensor:
        """Per-query mean NLL of G's ``outputs`` (plus EOS) under G, teacher forced: the regularization terms."""
        eos = self.gen_tokenizer.eos_token or ""
        batch = encode_pairs(self.gen_tokenizer, self.rewrite_texts(task, examples), [p + eos for p in outputs],
                             self.generator.device)
        # every row runs G under the same adapters, so the rewrite texts' common start (the template and p~
        # before the query: about half of each text) runs once, unless checkpointed blocks would drop its cache
        prefix = 0 if torch.is_grad_enabled() and is_checkpointed(self.generator) else shared_prefix_length(
            self.generator, batch)
        with self.g_lora.use(("enc", "dec")):
            return _mean_nll(self.generator, batch, prefix)

    # ---- F and M -------------------------------------------------------------------------------
    def factors(self, h: torch.Tensor) -> Factors | None:
        return self.hypernet(h) if self.use_hypernet else None

    @contextlib.contextmanager
    def as_actor(self, factors: Factors | None) -> Iterator[None]:
        """Context in which ``self.actor`` is M: base + static LoRA + each row's generated LoRA."""
        with self.m_lora.use(("static",) if self.has_static else (), factors, self.rows_scale):
            yield

    def actor_inputs(self, task: Task, examples: list[Example], prompts: list[str]) -> list[str]:
        return [render_chat(self.tokenizer, task.messages(p, ex)) for p, ex in zip(prompts, examples)]

    def answer_nll(
        self, task: Task, examples: list[Example], prompts: list[str], factors: Factors | None, max_length: int = 512,
        groups: list[int] | None = None,
    ) -> torch.Tensor:
        """Per-row mean NLL of each example's target (plus EOS) under M with the given prompt and LoRA.

        A row longer than ``max_length`` tokens loses the start of its own context (never its target), as
        :func:`~metatuner.evaluation.generation.encode_pairs` cuts it; the other rows are unaffected.

        ``groups`` (no grad: rollout scoring): the group of each row, rows of one group having the same
        generated LoRA (the candidates of one query). The rows' common start (the template and p~ before a
        candidate's hint) then runs once per group, not once per row."""
        eos = self.tokenizer.eos_token or ""
        batch = encode_pairs(
            self.tokenizer, self.actor_inputs(task, examples, prompts), [ex.target + eos for ex in examples],
            self.actor.device, max_length,
        )
        prefix = shared_prefix_length(self.actor, batch) if groups is not None and not torch.is_grad_enabled() else 0
        if not prefix:
            with self.as_actor(factors):
                return _mean_nll(self.actor, batch)
        order = list(dict.fromkeys(groups))
        first = [groups.index(g) for g in order]  # one row of each group
        with self.as_actor(select_rows(factors, first)):
            cache = prefix_cache(self.actor, batch, prefix, first)
        cache.batch_select_indices(torch.tensor([order.index(g) for g in groups], device=self.actor.device))
        with self.as_actor(factors):
            return _mean_nll(self.actor, batch, prefix, cache)


def draw_like_construction(actor, gen_cfg: GeneratorConfig, hyper_cfg: HypernetConfig) -> None:
    """Draws from torch's RNGs what ``MetaTuner(actor, tokenizer, gen_cfg, hyper_cfg)`` draws (the initial A
    of G's adapters ``enc``, ``dec`` and ``dec_frozen``, then F's initial weights), and keeps none of it.

    The SFT baseline trains a static LoRA on M alone (:class:`~metatuner.models.static.StaticLoRA`), and
    calls this first, so that with the same seed its adapter starts from the values MetaTuner's warm-up of
    M starts from (SFT is exactly that warm-up), and SFT runs draw what they drew when SFT was built as a
    MetaTuner with G and F unused. Nothing is built on or wrapped in ``actor``.
    """
    lora = LoRAModel(actor)
    K = lora.num_layers
    k = resolve_split(gen_cfg, K)

    def linear(site) -> nn.Linear:
        module = actor.get_submodule(lora.sites[site.key][1])
        return module.base if isinstance(module, LoRALinear) else module

    for layers in (range(0, k), range(k, K), range(k, K)):  # enc, dec, dec_frozen
        for site in lora.select(gen_cfg.targets, layers):
            initial_a(gen_cfg.rank, linear(site).in_features, linear(site).weight.device)
    sites = lora.select(hyper_cfg.targets, hyper_cfg.layers if hyper_cfg.layers is not None else range(K))
    shapes = {site.kind: (linear(site).in_features, linear(site).out_features) for site in sites}
    LoRAHypernet(actor.config.hidden_size, sites, shapes, K, hyper_cfg.rank, hyper_cfg.hidden, hyper_cfg.emb_dim)


def select_rows(factors: Factors | None, rows: list[int]) -> Factors | None:
    """The per-row LoRA factors of rows ``rows`` (None stays None)."""
    if factors is None:
        return None
    index = torch.tensor(rows, device=next(iter(factors.values()))[0].device)
    return {k: (a.index_select(0, index), b.index_select(0, index)) for k, (a, b) in factors.items()}


def repeat_factors(factors: Factors | None, n: int) -> Factors | None:
    """Each row's factors repeated ``n`` times (row i -> rows i*n .. i*n+n-1), for rollouts."""
    if factors is None:
        return None
    return {k: (a.repeat_interleave(n, 0), b.repeat_interleave(n, 0)) for k, (a, b) in factors.items()}


def _mean_nll(model, batch: dict[str, torch.Tensor], prefix: int = 0, cache=None) -> torch.Tensor:
    """``[bs]`` mean token NLL of the labelled positions (label != -100); ``prefix``, ``cache``: see
    :func:`token_logprobs`."""
    total, count = token_logprobs(model, batch, prefix, cache)
    return -total / count.clamp(min=1)
