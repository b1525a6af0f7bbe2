"""Collapse diagnostics of F and G: the Gram-matrix formulas against ΔW built explicitly."""

import json
import math

import pytest
import torch

from metatuner.training.diagnostics import lora_diagnostics, prompt_diagnostics, update_gram

SHAPES = {"0.q_proj": (12, 12), "0.v_proj": (12, 4), "1.down_proj": (20, 6)}  # key -> (in, out)


def random_factors(n, r=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(n, r, i, generator=g, dtype=dtype), torch.randn(n, o, r, generator=g, dtype=dtype))
            for k, (i, o) in SHAPES.items()}


def brute_force(factors, scale):
    """The same statistics from the explicit ΔW [n, out, in]."""
    norms, spreads = {}, []
    for key, (a, b) in factors.items():
        dw = scale * b.double() @ a.double()  # [n, out, in]
        norms[key] = dw.flatten(1).norm(dim=1).mean().item()
        mean = dw.mean(0)  # [out, in]
        var = (dw - mean).flatten(1).pow(2).sum(1).mean().item()
        spreads.append(math.sqrt(var) / mean.norm().item())
    return {"delta_norm": sum(norms.values()) / len(norms), "delta_spread": sum(spreads) / len(spreads),
            "delta_norm_per_site": norms}


@pytest.mark.parametrize("n", [1, 2, 5])
def test_lora_diagnostics_match_the_materialised_updates(n):
    factors, scale = random_factors(n, seed=n), 16 / 3
    got, want = lora_diagnostics(factors, scale), brute_force(factors, scale)
    assert got["delta_norm"] == pytest.approx(want["delta_norm"], rel=1e-9)
    assert got["delta_spread"] == pytest.approx(want["delta_spread"], rel=1e-6, abs=1e-12)
    assert got["delta_norm_per_site"] == pytest.approx(want["delta_norm_per_site"], rel=1e-9)
    assert set(got["delta_norm_per_site"]) == set(SHAPES)
    assert (got["delta_spread"] == 0.0) == (n == 1) and got["delta_norm"] > 0
    json.dumps(got)  # plain floats
    assert all(type(v) is float for v in [got["delta_norm"], got["delta_spread"], *got["delta_norm_per_site"].values()])


def test_gram_matrix_is_the_frobenius_inner_product_of_the_updates():
    a, b = random_factors(4, r=2, seed=7)["0.v_proj"]
    dw = 0.5 * b.double() @ a.double()
    assert torch.allclose(update_gram(a, b, 0.5), torch.einsum("iok,jok->ij", dw, dw), rtol=1e-10)


def test_identical_updates_for_every_query_have_zero_spread():
    one = random_factors(1, seed=3)
    factors = {k: (a.expand(6, -1, -1).clone(), b.expand(6, -1, -1).clone()) for k, (a, b) in one.items()}
    got = lora_diagnostics(factors, 2.0)
    assert got["delta_spread"] == 0.0
    assert got["delta_norm"] == pytest.approx(lora_diagnostics(one, 2.0)["delta_norm"], rel=1e-12)
    # the same ΔW from different factors (B_i A_i = (B c)(A / c)) is still no spread
    scaled = {k: (a / torch.arange(1.0, 7.0)[:, None, None], b * torch.arange(1.0, 7.0)[:, None, None])
              for k, (a, b) in factors.items()}
    assert lora_diagnostics(scaled, 2.0)["delta_spread"] == pytest.approx(0.0, abs=1e-6)


def test_zero_b_at_initialisation_gives_zero_norm_and_spread():
    factors = {k: (a, torch.zeros_like(b)) for k, (a, b) in random_factors(4).items()}
    assert lora_diagnostics(factors, 2.0) == {"delta_norm": 0.0, "delta_spread": 0.0,
                                              "delta_norm_per_site": {k: 0.0 for k in SHAPES}}


def test_lora_diagnostics_accept_bf16_factors_with_gradients():
    factors = {k: (a.bfloat16().requires_grad_(), b.bfloat16()) for k, (a, b) in random_factors(3).items()}
    got = lora_diagnostics(factors, 1.0)
    want = brute_force({k: (a.detach().float(), b.float()) for k, (a, b) in factors.items()}, 1.0)
    assert got["delta_norm"] == pytest.approx(want["delta_norm"], rel=1e-9)
    assert got["delta_spread"] == pytest.approx(want["delta_spread"], rel=1e-6)


def test_updates_that_cancel_to_a_zero_mean_have_infinite_spread():
    a, b = random_factors(1)["0.q_proj"]
    factors = {"s": (torch.cat([a, a]), torch.cat([b, -b]))}
    assert lora_diagnostics(factors, 1.0)["delta_spread"] == math.inf


def test_empty_factors_and_bad_shapes():
    assert lora_diagnostics({}, 1.0) == {"delta_norm": 0.0, "delta_spread": 0.0, "delta_norm_per_site": {}}
    with pytest.raises(ValueError, match="site s"):
        lora_diagnostics({"s": (torch.zeros(2, 3, 5), torch.zeros(2, 4, 2))}, 1.0)


def test_prompt_diagnostics():
    prompts = ["Solve it step by step.", "  Think.  ", "A much longer prompt with seven words", ""]
    initial = ["Solve it step by step.", "Think.", "Think.", "Think."]
    cut = [False, False, True, False]
    got = prompt_diagnostics(prompts, initial, cut)
    assert got == {"prompt_equal_initial": 0.5, "prompt_words": pytest.approx((5 + 1 + 7 + 0) / 4), "prompt_cut": 0.25}
    assert prompt_diagnostics([], [], []) == {"prompt_equal_initial": 0.0, "prompt_words": 0.0, "prompt_cut": 0.0}
    with pytest.raises(ValueError):
        prompt_diagnostics(["a"], ["a", "b"], [False])
