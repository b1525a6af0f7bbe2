"""The parameter generator F: a hypernetwork that writes LoRA factors for every target site of M.

For a query with meta-encoder state ``h`` (pooled hidden state of layer k of the prompt generator)
and a target site with layer embedding ``e_l`` and module-type embedding ``e_t``:

    z      = LayerNorm(h) ⊕ e_l ⊕ e_t
    θ_a    = W_u^a[t] · ReLU(W_d^a · z)        reshaped to A [r, in_t]
    θ_b    = W_u^b[t] · ReLU(W_d^b · z)        reshaped to B [out_t, r]
    ΔW     = λ · B A                           (λ = alpha / r)

These are the paper's two-layer ReLU MLPs. The down projections (the trunk) are shared by all sites
and conditioned on the embeddings, with one up projection (head) per module type, so F's size does
not grow with the depth of M (Text-to-LoRA style). The B heads start at zero, so at step 0 every
generated ΔW is zero and M is exactly its base model; the A heads start with a PEFT-like random bias
so gradients reach B from the first step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from metatuner.models.lora import Site


class LoRAHypernet(nn.Module):
    def __init__(
        self,
        in_dim: int,
        sites: list[Site],
        shapes: dict[str, tuple[int, int]],
        num_layers: int,
        rank: int = 8,
        hidden: int = 64,
        emb_dim: int = 32,
    ):
        """``shapes`` maps each module type to ``(in_features, out_features)`` of that linear layer."""
        super().__init__()
        self.rank = rank
        self.kinds = sorted({s.kind for s in sites})
        self.sites_by_kind = {k: [s for s in sites if s.kind == k] for k in self.kinds}
        self.shapes = shapes
        self.norm = nn.LayerNorm(in_dim)
        self.layer_emb = nn.Embedding(num_layers, emb_dim)
        self.kind_emb = nn.Embedding(len(self.kinds), emb_dim)
        self.down_a = nn.Linear(in_dim + 2 * emb_dim, hidden)
        self.down_b = nn.Linear(in_dim + 2 * emb_dim, hidden)
        self.up_a = nn.ModuleDict({k: nn.Linear(hidden, rank * shapes[k][0]) for k in self.kinds})
        self.up_b = nn.ModuleDict({k: nn.Linear(hidden, shapes[k][1] * rank) for k in self.kinds})
        for k in self.kinds:
            bound = 1 / math.sqrt(shapes[k][0])
            nn.init.uniform_(self.up_a[k].bias, -bound, bound)
            nn.init.normal_(self.up_a[k].weight, std=bound / math.sqrt(hidden))
            nn.init.zeros_(self.up_b[k].weight)
            nn.init.zeros_(self.up_b[k].bias)
        for k, idx in zip(self.kinds, range(len(self.kinds))):
            self.register_buffer(
                f"layers_{k}", torch.tensor([s.layer for s in self.sites_by_kind[k]]), persistent=False
            )
            self.register_buffer(f"kind_{k}", torch.tensor(idx), persistent=False)

    def forward(self, h: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``h [bs, in_dim]`` -> ``{site key: (A [bs, r, in], B [bs, out, r])}``."""
        bs = h.shape[0]
        h = self.norm(h)
        out = {}
        for k in self.kinds:
            layers = getattr(self, f"layers_{k}")
            n = layers.numel()
            e_l = self.layer_emb(layers)  # [n, e]
            e_t = self.kind_emb(getattr(self, f"kind_{k}")).expand(n, -1)  # [n, e]
            z = torch.cat([h[:, None].expand(bs, n, -1), torch.cat([e_l, e_t], -1)[None].expand(bs, -1, -1)], -1)
            fan_in, fan_out = self.shapes[k]
            a = self.up_a[k](torch.relu(self.down_a(z))).view(bs, n, self.rank, fan_in)  # [bs, n, r, in]
            b = self.up_b[k](torch.relu(self.down_b(z))).view(bs, n, fan_out, self.rank)  # [bs, n, out, r]
            for j, site in enumerate(self.sites_by_kind[k]):
                out[site.key] = (a[:, j], b[:, j])
        return out
