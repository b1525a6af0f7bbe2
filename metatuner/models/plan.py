"""Planning a GPU run without a GPU: parameters, memory per device, the cards it fits, and step time.

``plan(cfg, model_config)`` builds G, M and F on the ``meta`` device (shapes, no storage) with the same
constructors a run uses (:class:`~metatuner.models.metatuner.MetaTuner`, which adds G's adapters and
builds F; M's static LoRA is added when ``train`` has an actor warm-up), so every parameter count is
exact. Memory and FLOPs are estimates from those counts and the config's batch and lengths:

**Memory per device** (N-way data parallelism, as ``accelerate launch`` runs the trainer: each device
holds every weight and all optimizer state, and takes ``ceil(batch / N)`` queries of each batch):

- weights: M's parameters (and G's, when ``generator.model`` names another checkpoint) in
  ``model.dtype``; tied embeddings count once;
- adapters: every LoRA tensor and F in float32 (trained ones and the frozen copy of the prompt decoder);
- gradients (float32) and AdamW state (two float32 moments) of the parameters a step trains;
- activations: the peak of one joint step (below), without and with gradient checkpointing.

**Activations.** Per decoder layer and token, a pass with gradients saves (bytes; ``b`` = bytes of
``model.dtype``, ``h`` hidden, ``q``/``kv`` the widths of the query and key/value projections, ``i``
the MLP width; ``b`` is the autocast dtype's under ``train.autocast``, else the weights'; RMSNorm and
SwiGLU blocks as Llama, Qwen2 and Mistral have, with fused SDPA attention, which keeps no ``[T, T]``
matrix besides a padded batch's mask; eager attention, Gemma 2's, keeps ``heads * T`` probabilities per
token in float32 and in ``b``)::

    2 * (4h + 4)                 the two RMSNorms: each saves its input upcast to float32 (per norm the block
                                 has: Gemma's four, Qwen3's and Gemma 3's q and k norms over every head)
    b * 4q + 4 * heads + b * T   attention: q, k and v (repeated to every query head, since a padded batch
                                 has a mask), the output, the softmax's log-sum-exp, and the mask's row
    3 * i * b                    the MLP: gate, SiLU(gate), up (frozen projections save no input)
    LoRA, per adapted module     4 * in (its float32 input: one copy per module on a bf16/fp16 base, one
                                 per distinct input on a float32 one) + 4 * r per adapter and for F's rows

(measured exactly on a tiny Qwen2 in float32 and bfloat16 with autograd's saved-tensor hooks, and
within 5% over a real MetaTuner's encoder, F and task passes on padded batches: ``tests/test_plan.py``).
The output head runs on the answer tokens only and keeps ``(b + 8) * vocab``
bytes per token (the logits, their float32 copy and the log-softmax). F keeps, per row and generated
site, its input, its two hidden layers and the row's factors, ``4 * (h + 2e + 2 * hidden + r * (in + out))``.
With gradient checkpointing a pass keeps only each layer's input (``b * h`` per token) plus one layer's
activations while that layer is recomputed. Passes without gradients hold their KV cache (generation)
or one layer's live tensors, ``b * (2h + q + 2kv + 3i)`` per token, and their logits (rollout scoring:
``LOGIT_CHUNK`` answer positions at a time). Under ``train.autocast=bf16``/``fp16`` on float32 weights,
each layer of a pass with gradients also keeps half-precision copies of its weights.

One joint step (``schedule=joint``, the prompt branch active, a rollout step: the worst step) holds the
meta encoder's graph (k layers of G on the rewrite input) and F's through G's decoding, the rollout
scoring and M's task pass, and frees them at the task loss's backward before the regularizer's pass
of G::

    peak = max(encoder + F + max(task, decode, score), regularizer)

Lengths: M reads ``train.max_length`` tokens per query (the cap, so an upper bound), of which the gold
answer is ``target_tokens`` (default a quarter); G reads the rest (the rewrite input: template, p~ and
the query) and writes up to ``generator.max_prompt_tokens``; the meta encoder's pass is taken over all of
G's input (an upper bound: with ``generator.features=query`` it may run less). The CUDA context, the allocator's slack
and backward's transient gradient buffers are not counted: a card "fits" when the total is under
:data:`FIT_SHARE` of its memory.

**FLOPs** count the matrix products of one optimizer step per device: ``2 x params x tokens`` for a
pass without gradients (generation, rollout scoring, the frozen decoder's prompts), ``4 x`` for a pass
with gradients through frozen base weights (forward, and backward to the inputs only: the base's weight
gradients are never computed; full fine-tuning would be 6 x) and ``6 x`` for trained weights (F, the
LoRA factors). Gradient checkpointing adds one more forward (``2 x``) of every pass with gradients.
Attention's own products (``O(T^2)``) are left out (a few percent at 512 tokens). Step time is FLOPs
over the throughput the caller gives; decoding is bound by memory bandwidth, not by FLOPs, so the
decode part's real time is longer than this bound on any GPU.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from metatuner.config import RunConfig
from metatuner.errors import MetatunerError
from metatuner.evaluation.generation import LOGIT_CHUNK
from metatuner.models.loading import ALIASES, DTYPES, resolve
from metatuner.models.metatuner import MetaTuner

GIB = 1024**3
#: the cards a plan is checked against: name -> usable memory in GiB (an H200's 141 GB is 140 GiB as
#: nvidia-smi reports it)
CARDS: dict[str, float] = {"24 GB": 24.0, "40 GB": 40.0, "80 GB": 80.0, "141 GB": 140.0}
#: a plan fits a card when its total is at most this share of the card (the rest: CUDA context, allocator)
FIT_SHARE = 0.9
_ATTN_IN = ("q_proj", "k_proj", "v_proj")
_MLP_IN = ("gate_proj", "up_proj")


@dataclass(frozen=True)
class Lengths:
    """Tokens per query: M's input (``m``, with ``target`` answer tokens), G's rewrite input and G's output."""

    m: int
    target: int
    g: int
    prompt: int


@dataclass(frozen=True)
class ParamCounts:
    """Exact parameter counts (from the meta build). ``g == m`` when G shares M's base weights."""

    m: int
    g: int
    g_shared: bool
    f: int
    static: int
    encoder: int
    decoder: int
    decoder_frozen: int
    trained: tuple[str, ...]  # the groups a joint step trains (encoder, decoder, hypernet, static)

    @property
    def trainable(self) -> int:
        """Parameters the optimizer steps (float32, with gradients and AdamW state)."""
        sizes = {"encoder": self.encoder, "decoder": self.decoder, "hypernet": self.f, "static": self.static}
        return sum(sizes[g] for g in self.trained)

    @property
    def adapters(self) -> int:
        """Every float32 tensor besides the base: LoRAs (the frozen decoder copy too) and F."""
        return self.static + self.encoder + self.decoder + self.decoder_frozen + self.f


@dataclass(frozen=True)
class Memory:
    """Bytes per device."""

    weights: int
    adapters: int
    gradients: int
    optimizer: int
    activations: int
    activations_checkpointed: int

    def total(self, checkpointing: bool = False) -> int:
        act = self.activations_checkpointed if checkpointing else self.activations
        return self.weights + self.adapters + self.gradients + self.optimizer + act


@dataclass(frozen=True)
class Plan:
    """What :func:`plan` predicts for one device of an N-way data-parallel run (see the module docstring)."""

    model: str
    model_type: str
    dtype: str
    devices: int
    batch: int  # queries per device per micro-batch
    grad_accum: int
    k: int  # the meta encoder's depth
    layers: int  # M's decoder layers
    lengths: Lengths
    params: ParamCounts
    memory: Memory
    #: FLOPs per device of one joint step (averaged over rollout and non-rollout steps), by part
    step_flops: dict[str, float]
    #: FLOPs checkpointing adds to one joint step (one more forward of every pass with gradients)
    recompute_flops: float
    #: optimizer steps and FLOPs per device of each phase of the whole run (``train.steps``)
    phases: dict[str, tuple[int, float]] = field(default_factory=dict)
    #: bytes per device of each activation term of the peak, without checkpointing: encoder (G's layers
    #: below k), hypernet (F), task and task_logits (M), decode, score, reg (G) and reg_logits
    activation_parts: dict[str, float] = field(default_factory=dict)
    tflops: float | None = None
    #: ``train.gradient_checkpointing``: the column of the memory and time the run will have
    checkpointing: bool = False

    def fits(self, checkpointing: bool = False) -> dict[str, bool]:
        """Card name -> whether the total is at most :data:`FIT_SHARE` of it."""
        total = self.memory.total(checkpointing)
        return {name: total <= FIT_SHARE * gib * GIB for name, gib in CARDS.items()}

    def joint_flops(self, checkpointing: bool = False) -> float:
        return sum(self.step_flops.values()) + (self.recompute_flops if checkpointing else 0.0)

    def step_seconds(self, checkpointing: bool = False) -> float | None:
        """One joint step at ``tflops`` (None when no throughput was given)."""
        return None if not self.tflops else self.joint_flops(checkpointing) / (self.tflops * 1e12)

    def run_seconds(self) -> float | None:
        """The whole run (warm-ups, G's warm-up rollouts, joint steps) at ``tflops``, without checkpointing."""
        return None if not self.tflops else sum(f for _, f in self.phases.values()) / (self.tflops * 1e12)


# ---- the model's config ---------------------------------------------------------------------------
def load_model_config(name_or_path: str):
    """The ``transformers`` config of a model, without its weights.

    Args:
        name_or_path: a ``config.json`` file, a model folder, a built-in alias (converted once, as
            every command does) or a Hugging Face id (only its ``config.json`` is fetched).

    Returns:
        A ``PretrainedConfig``. An unreadable file or an id the hub cannot give is one
        :class:`~metatuner.errors.MetatunerError` line.
    """
    from transformers import AutoConfig

    path = Path(name_or_path).expanduser()
    if path.suffix == ".json" and not path.is_file():
        raise MetatunerError(f"no model config file {path}")
    try:
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or "model_type" not in data:
                raise MetatunerError(f"{path}: not a model config.json (no 'model_type')")
            return AutoConfig.for_model(**data)
        local = name_or_path in ALIASES or path.is_dir()
        source = resolve(name_or_path) if local else name_or_path
        return AutoConfig.from_pretrained(source, local_files_only=local)
    except MetatunerError:
        raise
    except Exception as e:  # noqa: BLE001 - one clear line instead of a hub traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MetatunerError(
            f"no model config for {name_or_path!r}: not a config.json, a model folder or a built-in alias "
            f"({', '.join(ALIASES)}), and the Hugging Face hub did not give one: {first}"
        ) from None


def meta_model(model_config, dtype: str = "float32") -> nn.Module:
    """The causal LM of ``model_config`` on the ``meta`` device: every shape, no storage, no init cost."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise MetatunerError(f"unknown dtype {dtype!r}; available: {', '.join(DTYPES)}")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=DTYPES[dtype])
    return model.eval().requires_grad_(False)


def build_meta(cfg: RunConfig, model_config, generator_config=None) -> MetaTuner:
    """G, F and M as a run builds them (:func:`~metatuner.training.build.build_metatuner`), on ``meta``;
    M's static LoRA is added when the run has an actor warm-up, as the trainer does."""
    actor = meta_model(model_config, cfg.model.dtype)
    generator = meta_model(generator_config, cfg.model.dtype) if generator_config is not None else None
    ablation = cfg.train.ablation
    with torch.device("meta"):  # F too: built anywhere else it would be initialised for real first
        mt = MetaTuner(actor, None, cfg.generator, cfg.hypernet, generator=generator, no_share=ablation == "no_share",
                       use_hypernet=ablation != "no_hypernet", use_prompt=ablation != "no_prompt")
        if cfg.train.warmups()[0] > 0:
            mt.add_static_adapter(cfg.train.static_rank, cfg.train.static_alpha)
    return mt


def _numel(params) -> int:
    return sum({id(p): p.numel() for p in params}.values())


def count_parameters(mt: MetaTuner) -> ParamCounts:
    """Exact counts of a (meta or real) MetaTuner's parts."""
    shared = mt.generator is mt.actor
    trained = [g for g, on in (("encoder", mt.k > 0 and (mt.use_hypernet or mt.use_prompt)),
                               ("decoder", mt.use_prompt), ("hypernet", mt.use_hypernet), ("static", mt.has_static))
               if on]
    return ParamCounts(
        m=_numel(mt.actor.parameters()) - _numel(_lora_params(mt.m_lora)),
        g=_numel(mt.generator.parameters()) - _numel(_lora_params(mt.g_lora)),
        g_shared=shared, f=_numel(mt.hypernet.parameters()),
        static=_numel(mt.m_lora.adapter_parameters("static")) if mt.has_static else 0,
        encoder=_numel(mt.g_lora.adapter_parameters("enc")), decoder=_numel(mt.g_lora.adapter_parameters("dec")),
        decoder_frozen=_numel(mt.g_lora.adapter_parameters("dec_frozen")), trained=tuple(trained),
    )


def _lora_params(lora) -> list[nn.Parameter]:
    return [p for m in lora.wrapped.values() for p in (*m.lora_A.values(), *m.lora_B.values())]


# ---- shapes, activations, FLOPs -------------------------------------------------------------------
@dataclass(frozen=True)
class _Shape:
    """One model's widths, read from its meta build."""

    h: int
    q: int
    kv: int
    i: int
    heads: int
    vocab: int
    layers: int
    layer_mm: float  # parameters of the matrix products of one decoder layer (mean over layers)
    head_mm: int  # parameters of the output head's product
    b: int  # bytes per element of the activations: the autocast dtype's, else the weights'
    wb: int  # bytes per element of the weights
    half_base: bool  # bf16 / fp16 weights: every LoRA-wrapped module upcasts its own copy of its input
    norms: tuple[tuple[int, int], ...] = ()  # per norm of a block: (elements normalised per token, vectors)
    eager: bool = False  # eager attention (Gemma 2's softcapping): keeps the [T, T] attention probabilities

    @classmethod
    def of(cls, model: nn.Module, autocast: str = "none") -> "_Shape":
        """The widths of ``model``; ``autocast`` is ``train.autocast`` (the activations' dtype)."""
        from metatuner.models.precision import autocast_dtype

        c = model.config
        c = getattr(c, "text_config", None) or c
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        kv_heads = getattr(c, "num_key_value_heads", None) or heads
        blocks = model.get_decoder().layers
        mm = sum(m.weight.numel() for m in blocks.modules() if isinstance(m, nn.Linear))
        weights = next(model.parameters()).dtype
        acts = autocast_dtype(autocast, weights) or weights
        norms = []  # each RMSNorm saves its float32 input: the hidden state, or every head's q or k (Qwen3, Gemma 3)
        for name, m in blocks[0].named_modules():
            if "norm" in type(m).__name__.lower() and getattr(m, "weight", None) is not None:
                width = m.weight.shape[0]
                total = heads * width if name.endswith("q_norm") else kv_heads * width if name.endswith("k_norm") \
                    else width
                norms.append((total, total // width))
        return cls(
            h=c.hidden_size, q=heads * head_dim, kv=kv_heads * head_dim, i=c.intermediate_size, heads=heads,
            vocab=model.get_output_embeddings().weight.shape[0], layers=len(blocks), layer_mm=mm / len(blocks),
            head_mm=model.get_output_embeddings().weight.numel(), b=acts.itemsize, wb=weights.itemsize,
            half_base=weights.itemsize < 4, norms=tuple(norms),
            eager=getattr(model.config, "_attn_implementation", "sdpa") == "eager",
        )

    def layer_bytes(self, lora: dict[str, tuple[int, int]] | None = None, width: int = 0,
                    padded: bool = False) -> float:
        """Bytes saved per token by one decoder layer in a pass with gradients (module docstring).

        ``lora``: module kind -> (its input width, the summed ranks of its adapters and per-row factors).
        ``width``: tokens per row; ``padded``: the batch is padded, so each layer keeps the attention mask
        (``b * width`` per token) and attention repeats k and v to every query head."""
        half = self.half_base
        norms = sum(4 * n + 4 * v for n, v in self.norms) if self.norms else 2 * (4 * self.h + 4)
        out = norms + 3 * self.i * self.b
        if self.eager:  # q, k and v repeated, the output, and the softmax's float32 probabilities (and a copy)
            out += self.b * 4 * self.q + self.heads * width * (4 if self.b == 4 else 4 + self.b)
        else:
            kv = self.q if padded else self.kv
            out += self.b * (2 * self.q + 2 * kv) + 4 * self.heads + (self.b * width if padded else 0)
        inputs = set()
        for kind, (width, ranks) in (lora or {}).items():
            out += 4 * ranks
            group = "attn" if kind in _ATTN_IN else "mlp" if kind in _MLP_IN else kind
            if half:
                out += 4 * width  # each wrapped module upcasts its own copy of the input
            elif group not in inputs and not (kind == "o_proj" and self.b == 4):  # o_proj: attention's saved output
                inputs.add(group)
                out += 4 * width
        return out

    def cast_bytes(self) -> float:
        """Bytes of the half-precision weight copies one layer's pass with gradients keeps when autocast
        runs float32 weights in a half dtype (each product casts its weight, and keeps the copy for the
        backward to the inputs); 0 otherwise."""
        return self.layer_mm * self.b if self.b < self.wb else 0.0

    def live_bytes(self) -> float:
        """Bytes per token one layer holds at once in a pass without gradients."""
        return self.b * (2 * self.h + self.q + 2 * self.kv + 3 * self.i)

    def kv_bytes(self) -> float:
        """KV-cache bytes per token over all layers."""
        return self.layers * 2 * self.kv * self.b


def _lora_map(mt: MetaTuner, lora, adapters: tuple[str, ...], layer: int, rows_rank: int = 0) -> dict:
    """{kind: (input width, summed ranks)} of the adapters (and F's rows) active at one layer."""
    out: dict[str, tuple[int, int]] = {}
    for key, module in lora.wrapped.items():
        site, _ = lora.sites[key]
        if site.layer != layer:
            continue
        ranks = sum(module.lora_A[a].shape[0] for a in adapters if a in module.lora_A)
        if rows_rank and any(s.key == key for s in mt.sites):
            ranks += rows_rank
        if ranks:
            out[site.kind] = (module.in_features, ranks)
    return out


def _pass_bytes(shape: _Shape, maps: list[dict], rows: int, width: int, checkpointing: bool) -> float:
    """Saved bytes of a pass with gradients of ``rows`` padded to ``width`` tokens through the layers
    described by ``maps`` (one per layer)."""
    tokens = rows * width
    per_layer = [shape.layer_bytes(m, width, padded=True) for m in maps]
    if not per_layer:
        return 0.0
    if checkpointing:  # each layer's input (the residual stream's dtype), and one layer recomputed at a time
        return tokens * (len(per_layer) * shape.wb * shape.h + max(per_layer)) + shape.cast_bytes()
    return tokens * sum(per_layer) + len(per_layer) * shape.cast_bytes()


def _logit_bytes(shape: _Shape, tokens: int) -> float:
    return tokens * (shape.b + 8) * shape.vocab


def _per_device(n: int, devices: int) -> int:
    return math.ceil(n / devices)


def plan(
    cfg: RunConfig,
    model_config=None,
    *,
    generator_config=None,
    devices: int = 1,
    tflops: float | None = None,
    target_tokens: int | None = None,
    lengths: Lengths | None = None,
    model_name: str | None = None,
) -> Plan:
    """Plans a MetaTuner run of ``cfg`` on ``devices`` GPUs (data parallel). See the module docstring.

    Args:
        cfg: the run's config (batch, lengths, adapters, ablation; ``model.dtype`` for the weights).
        model_config: M's ``transformers`` config; default: :func:`load_model_config` of ``model.name``.
        generator_config: G's config when ``generator.model`` names another checkpoint (default: loaded).
        devices: data-parallel processes; each takes ``ceil(batch / devices)`` queries of a batch.
        tflops: sustained throughput per device in TFLOP/s, for step times (None: FLOPs only).
        target_tokens: answer tokens per query (default: a quarter of ``train.max_length``).
        lengths: every length at once (overrides ``target_tokens`` and ``train.max_length``), e.g. a
            task's measured widths.
        model_name: the name printed (default: ``model.name``).

    Returns:
        A :class:`Plan`.

    Example::

        from metatuner.config import load_config
        p = plan(load_config(None, ["model.dtype=bfloat16"]), load_model_config("Qwen/Qwen2.5-7B-Instruct"),
                 devices=2, tflops=400)
        p.params.m, p.memory.total(checkpointing=True) / 2**30, p.fits(True)["24 GB"], p.step_seconds()
    """
    if devices < 1:
        raise MetatunerError(f"devices must be at least 1, got {devices}")
    if tflops is not None and tflops <= 0:
        raise MetatunerError(f"tflops must be > 0, got {tflops}")
    tc, gc = cfg.train, cfg.generator
    if model_config is None:
        model_config = load_model_config(cfg.model.name)
    if generator_config is None and gc.model not in (None, cfg.model.name):
        generator_config = load_model_config(gc.model)
    mt = build_meta(cfg, model_config, generator_config)
    counts = count_parameters(mt)
    ms, gs = _Shape.of(mt.actor, tc.autocast), _Shape.of(mt.generator, tc.autocast)
    if lengths is None:
        target = target_tokens if target_tokens is not None else max(1, tc.max_length // 4)
        if not 0 < target < tc.max_length:
            raise MetatunerError(f"target tokens must be in 1..{tc.max_length - 1} (train.max_length - 1), "
                                 f"got {target}")
        lengths = Lengths(m=tc.max_length, target=target, g=tc.max_length - target, prompt=gc.max_prompt_tokens)
    target = lengths.target

    bs = _per_device(tc.batch_size, devices)
    rq = min(tc.rollout_queries or bs, bs)
    reg_bs = _per_device(tc.reg_batch_size or max(1, tc.batch_size // 2), devices)
    n = tc.rollouts
    k, K = mt.k, ms.layers
    use_prompt, use_f = mt.use_prompt, mt.use_hypernet
    m_adapters = ("static",) if mt.has_static else ()
    f_rank = cfg.hypernet.rank if use_f else 0

    # ---- activations (bytes per device) ----
    enc_maps = [_lora_map(mt, mt.g_lora, ("enc",), layer) for layer in range(k)] if use_f else []
    task_maps = [_lora_map(mt, mt.m_lora, m_adapters, layer, f_rank) for layer in range(K)]
    reg_maps = [_lora_map(mt, mt.g_lora, ("enc",) if layer < k else ("dec",), layer) for layer in range(gs.layers)]
    f_row = sum(4 * (gs.h + 2 * cfg.hypernet.emb_dim + 2 * cfg.hypernet.hidden
                     + cfg.hypernet.rank * sum(mt.hypernet.shapes[s.kind])) for s in mt.sites)
    f_act = bs * f_row if use_f else 0.0
    task_logits = _logit_bytes(ms, bs * target)
    reg_logits = _logit_bytes(gs, reg_bs * lengths.prompt)
    rows_gen, rows_score = rq * n + bs, rq * (n + 2)  # G's samples + the frozen decoder's prompts; candidates
    decode = rows_gen * (lengths.g + lengths.prompt) * gs.kv_bytes() + (rq + bs) * lengths.g * gs.live_bytes() \
        + rows_gen * gs.vocab * 8
    if tc.reward == "nll":
        score = rows_score * lengths.m * ms.live_bytes() + _logit_bytes(ms, min(rows_score * target, LOGIT_CHUNK))
    else:
        score = rows_score * (lengths.m + target) * ms.kv_bytes() + rows_score * lengths.m * ms.live_bytes()

    def parts_of(ckpt: bool) -> dict[str, float]:
        return {"encoder": _pass_bytes(gs, enc_maps, bs, lengths.g, ckpt), "hypernet": f_act,
                "task": _pass_bytes(ms, task_maps, bs, lengths.m, ckpt), "task_logits": task_logits,
                "decode": decode if use_prompt else 0.0, "score": score if use_prompt else 0.0,
                "reg": _pass_bytes(gs, reg_maps, reg_bs, lengths.g + lengths.prompt, ckpt) if use_prompt else 0.0,
                "reg_logits": reg_logits if use_prompt else 0.0}

    def peak(ckpt: bool) -> int:
        a = parts_of(ckpt)
        held = a["encoder"] + a["hypernet"]  # the meta encoder's and F's graphs, kept until the task's backward
        return int(max(held + max(a["task"] + a["task_logits"], a["decode"], a["score"]), a["reg"] + a["reg_logits"]))

    weights = counts.m * ms.wb + (0 if counts.g_shared else counts.g * gs.wb)
    memory = Memory(
        weights=weights, adapters=4 * counts.adapters, gradients=4 * counts.trainable,
        optimizer=8 * counts.trainable, activations=peak(False), activations_checkpointed=peak(True),
    )

    # ---- FLOPs per device ----
    def fwd(shape: _Shape, layers: float, tokens: float, head_tokens: float) -> float:
        return 2 * (shape.layer_mm * layers * tokens + shape.head_mm * head_tokens)

    site_widths = sum(sum(mt.hypernet.shapes[s.kind]) for s in mt.sites)  # in + out over M's adapted modules
    lora_mm = site_widths * (tc.static_rank * len(m_adapters) + f_rank)  # LoRA parameters a token meets in M
    f_mm = sum(2 * (gs.h + 2 * cfg.hypernet.emb_dim) * cfg.hypernet.hidden
               + cfg.hypernet.hidden * cfg.hypernet.rank * sum(mt.hypernet.shapes[s.kind]) for s in mt.sites)
    feature_layers = k if k > 0 else mt.feature_layer
    every = 1.0 / tc.rollout_every if use_prompt else 0.0
    task_share, reg_share = (0.5, 0.5) if tc.schedule == "alternate" else (1.0, 1.0)
    if not use_prompt:
        task_share, reg_share = 1.0, 0.0
    grad_passes: dict[str, float] = {}  # part -> its forward FLOPs, for checkpointing's recompute
    parts: dict[str, float] = {}
    if use_f:
        enc_fwd = fwd(gs, feature_layers, bs * lengths.g, 0)
        grad_passes["encode"] = enc_fwd if k > 0 else 0.0
        parts["encode"] = (2 if k > 0 else 1) * enc_fwd * max(task_share, every)
        parts["hypernet"] = 6 * bs * f_mm * max(task_share, every)
    if use_prompt:
        greedy = fwd(gs, gs.layers, bs * lengths.g, bs) + fwd(gs, gs.layers, bs * lengths.prompt, bs * lengths.prompt)
        sampled = fwd(gs, gs.layers, rq * lengths.g, rq) + fwd(gs, gs.layers, rq * n * lengths.prompt,
                                                               rq * n * lengths.prompt)
        parts["decode"] = task_share * greedy + every * sampled
        head = rows_score * target
        parts["score"] = every * (fwd(ms, K, rows_score * lengths.m, head) if tc.reward == "nll" else
                                  fwd(ms, K, rows_score * (lengths.m - target), rows_score)
                                  + fwd(ms, K, head, head))
        reg_fwd = fwd(gs, gs.layers, reg_bs * (lengths.g + lengths.prompt), reg_bs * lengths.prompt)
        grad_passes["reg"] = reg_share * reg_fwd
        parts["reg"] = 2 * reg_share * reg_fwd
    task_fwd = fwd(ms, K, bs * lengths.m, bs * target)
    grad_passes["task"] = task_share * task_fwd
    parts["task"] = task_share * (2 * task_fwd + 6 * lora_mm * bs * lengths.m)
    accum = tc.grad_accum
    step_flops = {p: v * accum for p, v in parts.items()}
    recompute = accum * sum(grad_passes.values())

    # ---- the run's phases ----
    actor_steps, gen_steps = tc.warmups()
    if not (use_prompt and tc.generator_warmup_queries):
        gen_steps = 0
    joint_steps = tc.steps - actor_steps - gen_steps
    static_mm = site_widths * tc.static_rank
    sft = accum * (2 * fwd(ms, K, bs * lengths.m, bs * target) + 6 * static_mm * bs * lengths.m)
    phases = {"warm-up of M": (actor_steps, actor_steps * sft)}
    if gen_steps:
        wq = _per_device(tc.generator_warmup_queries, devices)
        rollouts = fwd(gs, gs.layers, wq * lengths.g, wq) + fwd(gs, gs.layers, wq * n * lengths.prompt,
                                                                wq * n * lengths.prompt) \
            + fwd(ms, K, wq * (n + 1) * lengths.m, wq * (n + 1) * target)
        g_step = 2 * fwd(gs, gs.layers, bs * (lengths.g + lengths.prompt), bs * lengths.prompt)
        if tc.overlap_warmups and (mt.has_static or use_f):
            g_step += step_flops.get("encode", 0.0) / accum + step_flops.get("hypernet", 0.0) / accum \
                + 2 * task_fwd + 6 * lora_mm * bs * lengths.m
        phases["warm-up of G"] = (gen_steps, rollouts + gen_steps * accum * g_step)
    phases["joint"] = (joint_steps, joint_steps * sum(step_flops.values()))
    c = model_config
    return Plan(
        model=model_name or cfg.model.name, model_type=getattr(c, "model_type", "?"), dtype=cfg.model.dtype,
        devices=devices, batch=bs, grad_accum=accum, k=k, layers=K, lengths=lengths, params=counts, memory=memory,
        step_flops=step_flops, recompute_flops=recompute, phases=phases, tflops=tflops,
        activation_parts=parts_of(False), checkpointing=tc.gradient_checkpointing,
    )


# ---- printing ---------------------------------------------------------------------------------------
def _n(x: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return str(int(x))


def _gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def _secs(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.2f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def format_plan(p: Plan) -> str:
    """The plan as the text ``metatuner plan`` prints."""
    c, m, L = p.params, p.memory, p.lengths
    lines = [
        f"plan: {p.model} ({p.model_type}, {p.dtype}) on {p.devices} device(s), data parallel: {p.batch} queries "
        f"per device per micro-batch, {p.grad_accum} micro-batch(es) per step",
        f"lengths per query: M reads {L.m} tokens ({L.target} of them the answer), G reads {L.g} and writes up to "
        f"{L.prompt}",
        "",
        "parameters (exact, built on the meta device)",
        f"  M  {c.m:>15,}  {_n(c.m)}",
        f"  G  {c.g:>15,}  {_n(c.g)}" + ("  (shares M's weights)" if c.g_shared else ""),
        f"  F  {c.f:>15,}  {_n(c.f)}",
        f"  trainable (float32) {c.trainable:,}: static LoRA {c.static:,}, encoder {c.encoder:,} (k = {p.k} of "
        f"{p.layers} layers), decoder {c.decoder:,}, F {c.f:,}; trained in joint steps: "
        f"{', '.join(c.trained) or 'none'}",
        "",
        f"memory per device (GiB)             {'no checkpointing':>17} {'checkpointing':>14}"
        f"   (train.gradient_checkpointing={str(p.checkpointing).lower()}: the "
        f"{'right' if p.checkpointing else 'left'} column)",
        f"  weights ({p.dtype})".ljust(36) + f"{_gib(m.weights):>17}",
        "  adapters and F (float32)".ljust(36) + f"{_gib(m.adapters):>17}",
        "  gradients (float32)".ljust(36) + f"{_gib(m.gradients):>17}",
        "  AdamW state (2 x float32)".ljust(36) + f"{_gib(m.optimizer):>17}",
        "  activations (peak of a joint step)".ljust(36) + f"{_gib(m.activations):>17} "
        f"{_gib(m.activations_checkpointed):>14}",
        "  total".ljust(36) + f"{_gib(m.total(False)):>17} {_gib(m.total(True)):>14}",
        "  activations by pass (GiB, no checkpointing): "
        + ", ".join(f"{k} {_gib(v)}" for k, v in p.activation_parts.items() if v),
        "    peak = max(encoder + hypernet + max(task + task_logits, decode, score), reg + reg_logits)",
        "",
        f"fits (total at most {FIT_SHARE:.0%} of the card)",
    ]
    plain, ckpt = p.fits(False), p.fits(True)
    for name in CARDS:
        lines.append(f"  {name:<8} {'yes' if plain[name] else 'no':>17} {'yes' if ckpt[name] else 'no':>14}")
    parts = ", ".join(f"{k} {v:.3g}" for k, v in p.step_flops.items())
    lines += ["", f"FLOPs per device of one joint step: {p.joint_flops():.3g} ({parts}); checkpointing adds "
              f"{p.recompute_flops:.3g}"]
    if p.tflops:
        lines.append(f"at {p.tflops:g} TFLOP/s per device: {_secs(p.step_seconds())} per joint step "
                     f"({_secs(p.step_seconds(True))} with checkpointing); the run's "
                     f"{sum(s for s, _ in p.phases.values())} "
                     f"steps ({', '.join(f'{k} {s}' for k, (s, _) in p.phases.items())}): {_secs(p.run_seconds())}; "
                     "decoding is bound by memory bandwidth, so its real time is longer")
    else:
        lines.append("step time: give a throughput (sustained TFLOP/s per device) to estimate it")
    return "\n".join(lines)
