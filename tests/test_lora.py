"""LoRA properties on the tiny Llama: zero init is exact, per-row LoRA equals PEFT's LoRA row by row
(forward, greedy generation, exported adapter folders), rows do not leak into each other, static
adapters add up and switch off, and the hypernetwork's outputs depend on its input.

PEFT is the reference: for row ``i`` of a batch, a PEFT model on an untouched copy of the same base
weights, holding row ``i``'s factors, must give that row's logits and generations.
"""

from __future__ import annotations

import copy
import math

import peft
import pytest
import safetensors.torch
import torch
from torch import nn

from metatuner.config import GeneratorConfig, HypernetConfig
from metatuner.errors import MetatunerError
from metatuner.evaluation.generation import generate
from metatuner.models.hypernet import LoRAHypernet
from metatuner.models.lora import LoRALinear, LoRAModel, peft_state_dict
from metatuner.models.metatuner import MetaTuner
from metatuner.tasks import get_task

KINDS = ["q_proj", "v_proj"]
RANK, ALPHA = 4, 8.0
TEXTS = ["Mia has 3 apples.", "Hi", "How many marbles does Leo have now? Think."]  # different lengths


# ---- helpers ------------------------------------------------------------------------------------
def right_padded(tok, texts):
    tok.padding_side = "right"  # right padding keeps each row's positions those of its unpadded input
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def logits(model, enc) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits  # [bs, T, V]


def wrap_sites(lora: LoRAModel, kinds=KINDS):
    """Wraps every site of ``kinds`` (``use`` only reaches layers that are already wrapped)."""
    sites = lora.select(kinds, range(lora.num_layers))
    for site in sites:
        lora.module(site)
    return sites


def random_factors(lora, sites, bs, rank=RANK, std_a=0.3, std_b=0.5, seed=1):
    """``{site key: (A [bs, r, in], B [bs, out, r])}`` with non-zero B, so every row's LoRA changes M."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for site in sites:
        m = lora.module(site)
        a = torch.randn(bs, rank, m.in_features, generator=g) * std_a  # [bs, r, in]
        b = torch.randn(bs, m.out_features, rank, generator=g) * std_b  # [bs, out, r]
        out[site.key] = (a, b)
    return out


def row(factors, i):
    """Row ``i``'s factors: ``{site key: (A [r, in], B [out, r])}``."""
    return {k: (a[i], b[i]) for k, (a, b) in factors.items()}


def lora_config(rank=RANK, alpha=ALPHA, kinds=KINDS):
    return peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(kinds), lora_dropout=0.0,
                           init_lora_weights=False)


def peft_model(base_copy, rank=RANK, alpha=ALPHA, kinds=KINDS):
    """A PEFT LoRA on ``base_copy`` (wrapped in place); its factors are loaded per row later."""
    return peft.get_peft_model(base_copy, lora_config(rank, alpha, kinds)).eval()


def load_row(pm, lora, factors, i):
    result = peft.set_peft_model_state_dict(pm, peft_state_dict(lora, row(factors, i)))
    assert not result.unexpected_keys, result.unexpected_keys[:3]
    assert not [k for k in result.missing_keys if "lora_" in k], "some LoRA tensors were not loaded"


@pytest.fixture()
def setup(tiny_model, tiny_tokenizer):
    """(model, untouched deep copy of its base weights, LoRAModel with q/v wrapped, sites)."""
    base_copy = copy.deepcopy(tiny_model)  # before wrapping: PEFT needs plain nn.Linear layers
    lora = LoRAModel(tiny_model)
    sites = wrap_sites(lora)
    return tiny_model, base_copy, lora, sites


# ---- zero init ------------------------------------------------------------------------------------
def test_zero_init_static_adapter_and_zero_rows_leave_logits_exact(tiny_model, tiny_tokenizer):
    enc = right_padded(tiny_tokenizer, TEXTS)
    base = logits(tiny_model, enc)
    lora = LoRAModel(tiny_model)
    sites = lora.add_adapter("s", KINDS, range(lora.num_layers), RANK, ALPHA)  # B zero, A random
    assert sites and all(isinstance(lora.module(s), LoRALinear) for s in sites)
    assert torch.equal(logits(tiny_model, enc), base)  # wrapped, nothing active
    zeros = {k: (a, torch.zeros_like(b)) for k, (a, b) in random_factors(lora, sites, len(TEXTS)).items()}
    with lora.use(active=["s"], rows=zeros, rows_scale=ALPHA / RANK):
        assert torch.equal(logits(tiny_model, enc), base)


def test_metatuner_at_init_is_the_base_model(tiny_model, tiny_tokenizer):
    task = get_task("arithmetic")
    examples = task.load("train")[:3]
    texts = [f"{task.instruction}\n{ex.query}" for ex in examples]
    enc = right_padded(tiny_tokenizer, texts)
    base = logits(tiny_model, enc)
    mt = MetaTuner(tiny_model, tiny_tokenizer, GeneratorConfig(), HypernetConfig())
    with torch.no_grad():
        factors = mt.factors(mt.encode(task, examples))
    assert set(factors) == {s.key for s in mt.sites} and all(torch.all(b == 0) for _, b in factors.values())
    with mt.as_actor(factors):
        assert torch.equal(logits(tiny_model, enc), base)


# ---- per-row LoRA against PEFT ------------------------------------------------------------------
def test_per_row_forward_equals_peft_row_by_row(setup, tiny_tokenizer):
    model, base_copy, lora, sites = setup
    enc = right_padded(tiny_tokenizer, TEXTS)
    factors = random_factors(lora, sites, len(TEXTS))
    with lora.use(rows=factors, rows_scale=ALPHA / RANK):
        batch = logits(model, enc)  # [bs, T, V]
    base = logits(model, enc)
    pm = peft_model(base_copy)
    lengths = enc["attention_mask"].sum(1).tolist()
    for i, text in enumerate(TEXTS):
        load_row(pm, lora, factors, i)
        single = logits(pm, right_padded(tiny_tokenizer, [text]))[0]  # [T_i, V]
        n = lengths[i]
        torch.testing.assert_close(batch[i, :n], single, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(batch[i, :n], base[i, :n], atol=1e-3)  # the LoRA really acts


def test_per_row_generation_equals_peft_row_by_row(setup, tiny_tokenizer):
    model, base_copy, lora, sites = setup
    factors = random_factors(lora, sites, len(TEXTS), std_b=0.5, seed=3)
    base_gen = [g.text for g in generate(model, tiny_tokenizer, TEXTS, 12)]
    with lora.use(rows=factors, rows_scale=ALPHA / RANK):
        batch_gen = [g.text for g in generate(model, tiny_tokenizer, TEXTS, 12)]  # left-padded inside
    pm = peft_model(base_copy)
    for i, text in enumerate(TEXTS):
        load_row(pm, lora, factors, i)
        assert generate(pm, tiny_tokenizer, [text], 12)[0].text == batch_gen[i], f"row {i}"
    assert batch_gen != base_gen  # otherwise the comparison could not fail


def test_rows_do_not_leak(setup, tiny_tokenizer):
    model, _, lora, sites = setup
    enc = right_padded(tiny_tokenizer, TEXTS)
    factors = random_factors(lora, sites, len(TEXTS))
    with lora.use(rows=factors, rows_scale=ALPHA / RANK):
        before = logits(model, enc)
    changed = {}
    for k, (a, b) in factors.items():
        a, b = a.clone(), b.clone()
        a[1] = torch.randn_like(a[1])
        b[1] = torch.randn_like(b[1])
        changed[k] = (a, b)
    with lora.use(rows=changed, rows_scale=ALPHA / RANK):
        after = logits(model, enc)
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])
    assert not torch.allclose(after[1], before[1])


# ---- static adapters -----------------------------------------------------------------------------
def test_two_static_adapters_add_up_on_one_linear():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 6))
    layer.add_adapter("a", rank=2, alpha=4.0)
    layer.add_adapter("b", rank=3, alpha=3.0)
    with torch.no_grad():
        for name in ("a", "b"):
            layer.lora_B[name].normal_()  # non-zero B so both terms count
    x = torch.randn(2, 5, 8)  # [bs, T, in]
    w0, bias = layer.base.weight, layer.base.bias
    expected = x @ w0.T + bias
    for name in ("a", "b"):
        expected = expected + layer.scaling[name] * (x @ layer.lora_A[name].T @ layer.lora_B[name].T)
    assert layer.scaling == {"a": 2.0, "b": 1.0}
    layer.active = ("a", "b")
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)


def test_two_static_adapters_in_a_model_and_use_restores_base(tiny_model, tiny_tokenizer):
    enc = right_padded(tiny_tokenizer, TEXTS)
    base = logits(tiny_model, enc)
    lora = LoRAModel(tiny_model)
    lora.add_adapter("a", ["q_proj"], range(lora.num_layers), 2, 4.0)
    lora.add_adapter("b", ["q_proj", "v_proj"], [0, 1], 3, 3.0)
    with torch.no_grad():
        for p in lora.adapter_parameters("a"):
            p.normal_()
        for p in lora.adapter_parameters("b"):
            p.normal_()
    site = lora.select(["q_proj"], [0])[0]
    mod = lora.module(site)
    x = torch.randn(2, 4, mod.in_features)  # [bs, T, in]
    expected = mod.base(x) + sum(
        mod.scaling[n] * (x @ mod.lora_A[n].T @ mod.lora_B[n].T) for n in ("a", "b")
    )
    with torch.no_grad(), lora.use(active=["a", "b"]):
        torch.testing.assert_close(mod(x), expected, atol=1e-6, rtol=1e-6)
        both = logits(tiny_model, enc)
    with lora.use(active=["a"]):
        only_a = logits(tiny_model, enc)
    assert not torch.allclose(both, base) and not torch.allclose(both, only_a)
    assert torch.equal(logits(tiny_model, enc), base)  # context left: the base model again
    with pytest.raises(RuntimeError), lora.use(active=["a", "b"]):
        raise RuntimeError("boom")
    assert torch.equal(logits(tiny_model, enc), base)  # restored after an error too


def test_unknown_target_module_names_the_available_ones(tiny_model):
    lora = LoRAModel(tiny_model)
    with pytest.raises(MetatunerError, match=r"'qkv_proj' is not in the model; available: .*q_proj.*v_proj"):
        lora.add_adapter("x", ["qkv_proj"], range(lora.num_layers), 2, 4.0)


# ---- export ----------------------------------------------------------------------------------------
def test_exported_adapter_folder_loads_in_peft_with_same_logits(setup, tiny_tokenizer, tmp_path):
    model, base_copy, lora, sites = setup
    enc = right_padded(tiny_tokenizer, TEXTS)
    factors = random_factors(lora, sites, len(TEXTS))
    with lora.use(rows=factors, rows_scale=ALPHA / RANK):
        batch = logits(model, enc)
    i = 2
    state = peft_state_dict(lora, row(factors, i))
    assert all(k.startswith("base_model.model.model.layers.") and ".default." not in k for k in state)
    lora_config().save_pretrained(tmp_path)
    safetensors.torch.save_file(state, tmp_path / "adapter_model.safetensors")
    pm = peft.PeftModel.from_pretrained(base_copy, tmp_path).eval()
    loaded = {n: p for n, p in pm.named_parameters() if "lora_" in n}
    assert len(loaded) == len(state) == 2 * len(sites)
    single = logits(pm, right_padded(tiny_tokenizer, [TEXTS[i]]))[0]
    n = int(enc["attention_mask"][i].sum())
    torch.testing.assert_close(batch[i, :n], single, atol=1e-5, rtol=1e-5)


# ---- hypernetwork ----------------------------------------------------------------------------------
def make_hypernet(tiny_model, rank=RANK):
    lora = LoRAModel(tiny_model)
    sites = wrap_sites(lora)
    shapes = {s.kind: (lora.module(s).in_features, lora.module(s).out_features) for s in sites}
    return LoRAHypernet(tiny_model.config.hidden_size, sites, shapes, lora.num_layers, rank=rank), sites, shapes


def test_hypernet_zero_heads_give_zero_b_and_right_shapes(tiny_model):
    torch.manual_seed(0)
    net, sites, shapes = make_hypernet(tiny_model)
    h = torch.randn(3, tiny_model.config.hidden_size)  # [bs, d]
    out = net(h)
    assert set(out) == {s.key for s in sites}
    for site in sites:
        a, b = out[site.key]
        fan_in, fan_out = shapes[site.kind]
        assert a.shape == (3, RANK, fan_in) and b.shape == (3, fan_out, RANK)
        assert torch.all(b == 0) and a.abs().sum() > 0


def test_hypernet_different_inputs_give_different_factors(tiny_model):
    torch.manual_seed(0)
    net, sites, _ = make_hypernet(tiny_model)
    with torch.no_grad():
        for head in net.up_b.values():
            nn.init.normal_(head.weight, std=1 / math.sqrt(head.in_features))
    h = torch.randn(2, tiny_model.config.hidden_size)  # [bs, d]: two different queries
    out = net(h)
    again = net(h.flip(0))  # same inputs, other order: factors follow their rows
    for site in sites:
        a, b = out[site.key]
        assert not torch.allclose(a[0], a[1]) and not torch.allclose(b[0], b[1])
        assert b.abs().sum() > 0
        torch.testing.assert_close(again[site.key][1][0], b[1])
        torch.testing.assert_close(again[site.key][0][1], a[0])
    # layers of one kind get different factors too (the layer embedding reaches the output)
    q = [out[s.key][1][0] for s in sites if s.kind == "q_proj"]
    assert not torch.allclose(q[0], q[1])


def test_use_contexts_nest(tiny_model):
    from metatuner.models.lora import LoRAModel

    lora = LoRAModel(tiny_model)
    lora.add_adapter("one", ["q_proj"], range(4), rank=2, alpha=2)
    lora.add_adapter("two", ["q_proj"], range(4), rank=2, alpha=2)
    with lora.use(("one",)):
        with lora.use(("two",)):
            assert all(m.active == ("two",) for m in lora.wrapped.values())
        assert all(m.active == ("one",) for m in lora.wrapped.values())
    assert all(m.active == () for m in lora.wrapped.values())


def test_the_exported_adapter_config_is_what_peft_writes_and_loads(tmp_path):
    import json

    from peft import LoraConfig

    from metatuner.models.export import peft_config_json

    config = LoraConfig(r=4, lora_alpha=4, target_modules=["v_proj", "q_proj"], layers_to_transform=[0, 2],
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", base_model_name_or_path="tiny")
    config.save_pretrained(tmp_path / "peft")
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    ours = json.loads(peft_config_json(config))
    # PEFT lists a set in its hash order, which varies between processes; ours are sorted
    assert ours["target_modules"] == ["q_proj", "v_proj"] and set(theirs.pop("target_modules")) == {"q_proj", "v_proj"}
    assert {k: v for k, v in ours.items() if k != "target_modules"} == theirs
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "adapter_config.json").write_text(peft_config_json(config))
    assert LoraConfig.from_pretrained(tmp_path / "ours") == config
