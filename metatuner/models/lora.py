"""LoRA on a frozen base model: named static adapters plus per-row (per-query) adapters.

A wrapped linear layer with frozen weight ``W0`` computes, for row ``i`` of a batch,

    y_i = W0 x_i  +  Σ_{a ∈ active} λ_a · B_a A_a x_i  +  λ_r · B_i A_i x_i

- static adapters ``(A_a [r, in], B_a [out, r])`` are ordinary parameters (the prompt generator's
  adapters, the warm-up SFT adapter); several can be active at once and they are switched per call;
- per-row factors ``A [bs, r, in]``, ``B [bs, out, r]`` are handed in for one batch (by the
  hypernetwork) and applied with two batched matmuls: ``[bs, T, in] @ [bs, in, r] -> [bs, T, r]``,
  then ``@ [bs, r, out] -> [bs, T, out]``. No ``[out, in]`` delta is ever built and there is no loop
  over rows, so the cost is ``O(T · r · (in + out))`` per row, the same as a static LoRA.

PEFT cannot give every row of a batch its own adapter, which is why this layer exists; static
adapters live here too so that one copy of the frozen base serves the prompt generator and the
downstream model at once. :func:`peft_state_dict` writes a per-row adapter in PEFT's format.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from metatuner.errors import MetatunerError

_LAYER_RE = re.compile(r"\.layers\.(\d+)\.(?:.*\.)?(\w+)$")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus static and per-row LoRA terms (see the module docstring)."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.active: tuple[str, ...] = ()
        self.masks: dict[str, torch.Tensor] = {}  # adapter -> [bs] weight per row (absent: every row)
        self.rows: tuple[torch.Tensor, torch.Tensor, float] | None = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def add_adapter(self, name: str, rank: int, alpha: float) -> None:
        """A new adapter, in float32 whatever the base's dtype: in bf16 an AdamW update of 1e-4 is below the
        resolution of A's entries, so trainable weights (and so their optimizer state) stay fp32."""
        w = self.base.weight
        self.lora_A[name] = nn.Parameter(initial_a(rank, self.in_features, w.device))
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, rank, dtype=torch.float32, device=w.device))
        self.scaling[name] = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in-place adds: no extra [bs, T, out] temporaries (a linear layer's backward never needs its output)
        y = self.base(x)
        if not self.active and self.rows is None:
            return y
        if x.dtype == torch.float32 and y.dtype == torch.float32:  # a float32 base, no autocast
            return self._add_terms(y, x)
        # the adapters are float32: a bf16 / fp16 base, or one under autocast, adds its LoRA terms up in float32
        # (autocast off: it would run them in half precision), then into y
        with torch.autocast(x.device.type, enabled=False):
            acc = self._add_terms(torch.zeros_like(y, dtype=torch.float32), x.float())
        return y.add_(acc.to(y.dtype))

    def _add_terms(self, acc: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``acc`` (float32, ``[bs, T, out]``) plus every active LoRA term of ``x`` (float32), in place."""
        for name in self.active:
            delta = nn.functional.linear(nn.functional.linear(x, self.lora_A[name]), self.lora_B[name])
            if name in self.masks:
                delta = delta * self.masks[name].view(-1, *(1,) * (delta.dim() - 1))  # rows without it get 0
            acc = acc.add_(delta, alpha=self.scaling[name])
        if self.rows is not None:
            a, b, scale = self.rows  # a [bs, r, in], b [bs, out, r], float32
            h = torch.bmm(x, a.transpose(1, 2))  # [bs, T, r]
            acc = acc.baddbmm_(h, b.transpose(1, 2), alpha=scale)  # [bs, T, out]
        return acc


def initial_a(rank: int, in_features: int, device) -> torch.Tensor:
    """A new adapter's A ``[rank, in_features]`` (float32), drawn from torch's RNG on ``device``: PEFT's
    default, with B zero, so an adapter changes nothing at init."""
    a = torch.empty(rank, in_features, dtype=torch.float32, device=device)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return a


@dataclass(frozen=True)
class Site:
    """Where a LoRA can go: decoder layer ``layer``, linear module type ``kind`` (e.g. ``q_proj``)."""

    layer: int
    kind: str

    @property
    def key(self) -> str:
        return f"{self.layer}.{self.kind}"


class LoRAModel:
    """Wraps the linear layers of a decoder-only model so LoRA adapters can be added and switched.

    ``add_adapter("enc", kinds=["q_proj", "v_proj"], layers=range(0, 4), rank=8, alpha=16)`` adds a
    static adapter; ``use(active=[...], rows={site_key: (A, B)}, rows_scale=λ)`` is the context in which
    a forward pass sees exactly those adapters. Outside ``use`` no adapter is active: the base model.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.sites: dict[str, tuple[Site, str]] = {}  # key -> (site, module path)
        self.wrapped: dict[str, LoRALinear] = {}
        modules = dict(model.named_modules())
        for path, module in modules.items():
            m = _LAYER_RE.search("." + path)
            inside_wrapper = isinstance(modules.get(path.rpartition(".")[0]), LoRALinear)
            if isinstance(module, (nn.Linear, LoRALinear)) and m and not inside_wrapper:
                site = Site(int(m.group(1)), m.group(2))
                self.sites[site.key] = (site, path)
                if isinstance(module, LoRALinear):
                    self.wrapped[site.key] = module
        if not self.sites:
            raise MetatunerError(
                f"unsupported model {type(model).__name__}: no linear layers inside a '.layers.N.' list of decoder "
                "blocks (Llama, Qwen2, Mistral, Gemma 2/3, Phi-3 and other decoders that name their blocks 'layers')"
            )
        self.num_layers = 1 + max((s.layer for s, _ in self.sites.values()), default=-1)
        self.adapters: dict[str, list[str]] = {}  # adapter name -> site keys

    def kinds(self) -> list[str]:
        return sorted({s.kind for s, _ in self.sites.values()})

    def select(self, kinds: list[str], layers) -> list[Site]:
        """The sites of the given module kinds in the given layers; unknown kinds are an error."""
        unknown = [k for k in kinds if k not in self.kinds()]
        if unknown:
            raise MetatunerError(
                f"target module {unknown[0]!r} is not in the model; available: {', '.join(self.kinds())}"
            )
        layers = set(layers)
        return [s for s, _ in self.sites.values() if s.kind in kinds and s.layer in layers]

    def module(self, site: Site) -> LoRALinear:
        """The wrapped layer at ``site`` (wrapped on first use)."""
        if site.key not in self.wrapped:
            _, path = self.sites[site.key]
            parent_path, _, attr = path.rpartition(".")
            parent = self.model.get_submodule(parent_path)
            wrapped = LoRALinear(getattr(parent, attr))
            setattr(parent, attr, wrapped)
            self.wrapped[site.key] = wrapped
        return self.wrapped[site.key]

    def add_adapter(self, name: str, kinds: list[str], layers, rank: int, alpha: float) -> list[Site]:
        sites = self.select(kinds, layers)
        for site in sites:
            self.module(site).add_adapter(name, rank, alpha)
        self.adapters[name] = [s.key for s in sites]
        return sites

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        for key in self.adapters[name]:
            yield self.wrapped[key].lora_A[name]
            yield self.wrapped[key].lora_B[name]

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        out = {}
        for key in self.adapters[name]:
            out[f"{key}.A"] = self.wrapped[key].lora_A[name]
            out[f"{key}.B"] = self.wrapped[key].lora_B[name]
        return out

    @torch.no_grad()
    def copy_adapter(self, src: str, dst: str) -> None:
        """Copies adapter ``src`` into ``dst`` (same sites), e.g. to re-synchronise a frozen copy."""
        for key in self.adapters[src]:
            m = self.wrapped[key]
            m.lora_A[dst].copy_(m.lora_A[src])
            m.lora_B[dst].copy_(m.lora_B[src])

    @contextlib.contextmanager
    def use(
        self,
        active: tuple[str, ...] | list[str] = (),
        rows: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        rows_scale: float = 1.0,
        masks: dict[str, torch.Tensor] | None = None,
    ) -> Iterator[None]:
        """Within this context forward passes use the ``active`` static adapters and the per-row factors.

        ``masks`` restricts an active static adapter to some rows of the batch (``[bs]``, 1 = on, 0 = off),
        so rows with different adapters run in one batch (e.g. the prompt decoder and its frozen copy).
        Contexts nest: leaving one restores what the enclosing context had set.
        """
        unknown = [k for k in (rows or {}) if k not in self.sites]
        if unknown:
            raise MetatunerError(f"per-row factors for unknown site {unknown[0]!r}")
        for key in rows or {}:
            self.module(self.sites[key][0])
        saved = self._state()
        for key, m in self.wrapped.items():
            m.active = tuple(a for a in active if a in m.lora_A)
            m.masks = {a: w.to(torch.float32) for a, w in (masks or {}).items() if a in m.active}
            m.rows = None
            if rows is not None and key in rows:
                a, b = rows[key]  # F's output, float32; a bf16 base computes the LoRA terms in float32 too
                m.rows = (a.float(), b.float(), rows_scale)
        try:
            yield
        finally:
            self._set_state(saved)

    def _state(self) -> dict[str, tuple]:
        """What ``use`` sets, per wrapped layer: its active adapters, per-row factors and row masks."""
        return {key: (m.active, m.rows, m.masks) for key, m in self.wrapped.items()}

    def _set_state(self, state: dict[str, tuple]) -> None:
        for key, m in self.wrapped.items():
            m.active, m.rows, m.masks = state.get(key, ((), None, {}))

    def recompute_context(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """``context_fn`` for :func:`torch.utils.checkpoint.checkpoint` (non-reentrant): the contexts of a
        checkpointed block's forward and of its recomputation in the backward pass.

        The backward pass runs after ``use`` has been left, so the adapters set then would be gone; the
        recomputation runs with those the forward saw (its active adapters, per-row factors and masks),
        recorded here when the forward starts. Returns ``(nothing, those adapters)``.
        """
        return contextlib.nullcontext(), self._restored(self._state())

    @contextlib.contextmanager
    def _restored(self, state: dict[str, tuple]) -> Iterator[None]:
        now = self._state()
        self._set_state(state)
        try:
            yield
        finally:
            self._set_state(now)


def peft_state_dict(
    lora: LoRAModel, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], prefix: str = "base_model.model."
) -> dict[str, torch.Tensor]:
    """PEFT-format tensors for one row's LoRA (``A [r, in]``, ``B [out, r]`` per site key)."""
    out = {}
    for key, (a, b) in factors.items():
        _, path = lora.sites[key]
        out[f"{prefix}{path}.lora_A.weight"] = a.detach().contiguous().cpu()
        out[f"{prefix}{path}.lora_B.weight"] = b.detach().contiguous().cpu()
    return out
