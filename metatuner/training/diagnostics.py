"""Diagnostics of what F writes and what G generates: is MetaTuner still per-query, or has it collapsed?

LoRA side. For a target site s and n queries, F writes ``A_i [r, in]`` and ``B_i [out, r]``, and
query i's weight change is ``ΔW_i = λ B_i A_i [out, in]``. With the Gram matrix of the updates

    G_ij = <ΔW_i, ΔW_j>_F = λ² tr((B_i A_i)ᵀ B_j A_j) = λ² tr((B_iᵀ B_j)(A_j A_iᵀ))
         = λ² Σ_ab (B_iᵀ B_j)_ab (A_i A_jᵀ)_ab

(only [n, r, n, r] products, never the [n, out, in] stack of ΔW), we report per site

    norm   = mean_i ||ΔW_i||_F                         = mean_i sqrt(G_ii)
    mean   = ||ΔW̄||_F,  ΔW̄ = mean_j ΔW_j              = sqrt(mean_ij G_ij)
    spread = sqrt(mean_i ||ΔW_i - ΔW̄||²_F) / ||ΔW̄||_F

where mean_i ||ΔW_i - ΔW̄||² = (1 / 2n²) Σ_ij ||ΔW_i - ΔW_j||² = (1 / 2n²) Σ_ij (G_ii + G_jj - 2 G_ij),
summed pair by pair, with a pair's distance below 1e-12 of its squared norms (float64 rounding)
counted as 0, so that identical updates give exactly 0 rather than a rounding residue. spread is 0
when every query gets the same ΔW (F has collapsed to a static LoRA) and grows as the updates
differ; it is defined as 0 when both the spread and the mean are ~0 (e.g. at initialisation, where
B = 0), and is +inf in the degenerate case of nonzero updates that cancel to a zero mean. Everything
is computed in float64. ``delta_norm`` and ``delta_spread`` average the per-site values over sites.

Prompt side: the share of generated prompts equal to the task's initial prompt p~ (G copying its
input), their mean length in words, the share cut by the token cap before finishing, and the share of
G's outputs that stated an answer (``prompt_stated_answer``; those are served as p~).
"""

from __future__ import annotations

import math
from typing import Any

import torch

TINY = 1e-12  # a Frobenius norm at or below this counts as zero
REL = 1e-12  # ||ΔW_i - ΔW_j||² below REL (||ΔW_i||² + ||ΔW_j||²) is float64 rounding: counted as 0


@torch.no_grad()
def update_gram(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``G [n, n]`` (float64) with ``G_ij = <ΔW_i, ΔW_j>_F`` for ``a [n, r, in]``, ``b [n, out, r]``."""
    n, r, _ = a.shape
    a = a.detach().double().reshape(n * r, -1)  # [n*r, in], row (i, a) = A_i[a, :]
    b = b.detach().double().transpose(1, 2).reshape(n * r, -1)  # [n*r, out], row (i, a) = B_i[:, a]
    p = (b @ b.T).view(n, r, n, r)  # P[i, a, j, b] = (B_iᵀ B_j)_ab
    q = (a @ a.T).view(n, r, n, r)  # Q[i, a, j, b] = (A_i A_jᵀ)_ab
    return scale**2 * (p * q).sum((1, 3))  # [n, n]


def _site_stats(gram: torch.Tensor) -> tuple[float, float]:
    """(mean_i ||ΔW_i||_F, spread) from the Gram matrix ``[n, n]`` of one site's updates."""
    n = gram.shape[0]
    diag = gram.diagonal()  # [n] = ||ΔW_i||²
    norm = diag.clamp(min=0).sqrt().mean().item()
    both = diag[:, None] + diag[None, :]  # [n, n]
    pair = both - 2 * gram  # [n, n] = ||ΔW_i - ΔW_j||²
    pair = torch.where(pair > REL * both, pair, torch.zeros_like(pair))  # rounding residue -> exactly 0
    spread = math.sqrt(pair.sum().item() / (2 * n * n))
    mean = math.sqrt(max(gram.mean().item(), 0.0))  # ||ΔW̄||_F
    if mean <= TINY:
        return norm, 0.0 if spread <= TINY else math.inf
    return norm, spread / mean


def lora_diagnostics(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float) -> dict:
    """``factors``: ``{site key: (A [n, r, in], B [n, out, r])}`` as F writes them, ``scale`` = λ.

    Returns ``{"delta_norm": float, "delta_spread": float, "delta_norm_per_site": {key: float}}`` (plain
    floats, see the module docstring); all zeros for an empty dict or n = 0.
    """
    norms, spreads = {}, []
    for key, (a, b) in factors.items():
        if a.shape[0] == 0:
            continue
        if a.shape[0] != b.shape[0] or a.shape[1] != b.shape[2]:
            raise ValueError(f"site {key}: A {tuple(a.shape)} and B {tuple(b.shape)} are not [n, r, in], [n, out, r]")
        norm, spread = _site_stats(update_gram(a, b, scale))
        norms[key] = norm
        spreads.append(spread)
    return {
        "delta_norm": sum(norms.values()) / len(norms) if norms else 0.0,
        "delta_spread": sum(spreads) / len(spreads) if spreads else 0.0,
        "delta_norm_per_site": norms,
    }


def prompt_diagnostics(prompts: list[str], initial: list[str], cut: list[bool]) -> dict:
    """Generated ``prompts`` against the initial prompts p~ (``initial``, same order) and whether each
    generation hit the token cap unfinished (``cut``). Returns ``prompt_equal_initial`` (share equal to
    their p~ after ``strip()``), ``prompt_words`` (mean whitespace-word count) and ``prompt_cut`` (share
    cut); all 0.0 for no prompts."""
    if not len(prompts) == len(initial) == len(cut):
        raise ValueError(f"{len(prompts)} prompts, {len(initial)} initial prompts and {len(cut)} cut flags")
    n = len(prompts)
    if n == 0:
        return {"prompt_equal_initial": 0.0, "prompt_words": 0.0, "prompt_cut": 0.0}
    return {
        "prompt_equal_initial": sum(p.strip() == q.strip() for p, q in zip(prompts, initial)) / n,
        "prompt_words": sum(len(p.split()) for p in prompts) / n,
        "prompt_cut": sum(bool(c) for c in cut) / n,
    }


def validate(mt, task, val: list, batch_size: int, gate_margin: float | None = None) -> dict[str, Any]:
    """Scores MetaTuner on the validation examples with its generated prompts, with the diagnostics above;
    with ``gate_margin`` (the final validation, gate on) also with p~, and sets the prompt gate: generated
    prompts are served (``mt.serve_generated``) only if :func:`~metatuner.evaluation.gate.gate_opens`."""
    from metatuner.evaluation.gate import gate_opens
    from metatuner.evaluation.harness import evaluate
    from metatuner.tasks.leaks import states_answer
    from metatuner.training.predictor import MetaTunerPredictor

    bs = batch_size
    # a stop request waits for the trainer's next step boundary, not this evaluation's next batch
    run = lambda predictor: evaluate(predictor, task, val, batch_size=bs, likelihood=False,  # noqa: E731
                                     progress=False, stoppable=False)
    generated = MetaTunerPredictor(mt, prompts="generated", trace_limit=len(val))
    result = run(generated)
    record: dict[str, Any] = {f"val_{result.primary_metric}": result.score}
    if mt.use_hypernet:
        with torch.no_grad():
            parts = [mt.factors(mt.encode(task, val[i : i + bs])) for i in range(0, len(val), bs)]
        factors = {k: (torch.cat([p[k][0] for p in parts]), torch.cat([p[k][1] for p in parts])) for k in parts[0]}
        record.update(lora_diagnostics(factors, mt.rows_scale))
    if mt.use_prompt:
        trace = [generated.trace[ex.id] for ex in val]
        record.update(prompt_diagnostics([mt.compose(task, ex, o) for ex, (o, _) in zip(val, trace)],
                                         [task.instruction_for(ex) for ex in val], [c for _, c in trace]))
        # outputs that stated an answer: compose replaced them by p~, so they never reached M
        record["prompt_stated_answer"] = sum(states_answer(task, ex, o) for ex, (o, _) in zip(val, trace)) / len(val)
        if gate_margin is not None:
            initial = run(MetaTunerPredictor(mt, prompts="initial"))
            mt.serve_generated = gate_opens(result.score, initial.score, gate_margin)
            record.update({f"val_{result.primary_metric}_initial": initial.score,
                           "gate": "generated" if mt.serve_generated else "initial"})
    record["sample_prompts"] = [{"id": r["id"], "prompt": r["instruction"], "output": r["output"]}
                                for r in result.records[:3]]
    return record
