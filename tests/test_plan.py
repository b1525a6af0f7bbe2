"""`metatuner plan`: exact parameter counts from a meta build, the activation formula against what autograd
really saves, the fit and FLOP arithmetic, the bench protocol for one GPU, and the command itself.

The Qwen2.5 configs under tests/data/ are the published config.json files (Qwen/Qwen2.5-*-Instruct); the
SmolLM2 one is the default model's (the built-in alias converted). Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from metatuner.cli import main
from metatuner.config import load_config
from metatuner.errors import MetatunerError
from metatuner.models.lora import LoRAModel
from metatuner.models.plan import CARDS, FIT_SHARE, GIB, _Shape, load_model_config, plan

DATA = Path(__file__).parent / "data"
# published sizes (the model cards' "Number of Parameters") and the exact counts they round
QWEN = {"0.5b": (0.49e9, 494_032_768), "1.5b": (1.54e9, 1_543_714_304), "3b": (3.09e9, 3_085_938_688),
        "7b": (7.62e9, 7_615_616_512)}


@pytest.fixture(scope="module")
def qwen_configs():
    return {size: load_model_config(str(DATA / f"qwen2.5-{size}" / "config.json")) for size in QWEN}


@pytest.fixture(scope="module")
def qwen_plans(qwen_configs):
    """The default run config in bf16 on each Qwen2.5 size, one device."""
    return {size: plan(load_config(None, ["model.dtype=bfloat16"]), c) for size, c in qwen_configs.items()}


@pytest.mark.parametrize("size", list(QWEN))
def test_qwen25_parameter_counts_match_the_published_sizes(qwen_plans, size):
    published, exact = QWEN[size]
    p = qwen_plans[size]
    assert abs(p.params.m - published) / published < 0.01
    assert p.params.m == exact  # the sum of the checkpoint's tensors (tied embeddings once)
    assert p.params.g == p.params.m and p.params.g_shared
    assert p.memory.weights == 2 * exact  # bf16, one copy for G and M


def _real_counts(mt) -> dict[str, int]:
    """Counts read off a real build by other means than the planner's: names and the trainer's groups."""
    groups = {k: sum(p.numel() for p in ps) for k, ps in mt.parameter_groups().items()}
    base = sum(p.numel() for n, p in mt.actor.named_parameters() if ".lora_" not in n)
    return {"m": base, "f": groups["hypernet"], "encoder": groups["encoder"], "decoder": groups["decoder"],
            "static": groups.get("static", 0), "trainable": sum(groups.values())}


@pytest.mark.parametrize("shape", ["tiny-llama", "smollm2-135m-2-layers"])
def test_meta_counts_equal_a_real_build(tiny_tokenizer, shape):
    """The default run config on a real (random) build and on the planner's meta build: the same counts."""
    from transformers import AutoModelForCausalLM

    from conftest import make_model
    from metatuner.training.build import build_metatuner

    if shape == "tiny-llama":
        model = make_model(tiny_tokenizer)
    else:  # the default model's widths (F's shapes are the real ones), fewer layers and a small vocabulary
        config = load_model_config(str(DATA / "smollm2-135m" / "config.json"))
        config.num_hidden_layers, config.vocab_size = 2, 512
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    cfg = load_config(None, [])
    mt = build_metatuner(cfg, model, tiny_tokenizer)
    mt.add_static_adapter(cfg.train.static_rank, cfg.train.static_alpha)  # the trainer adds it (actor warm-up)
    real = _real_counts(mt)
    p = plan(cfg, model.config)
    got = {"m": p.params.m, "f": p.params.f, "encoder": p.params.encoder, "decoder": p.params.decoder,
           "static": p.params.static, "trainable": p.params.trainable}
    assert got == real
    assert p.params.decoder_frozen == p.params.decoder
    assert p.memory.weights == 4 * real["m"] and p.memory.optimizer == 8 * real["trainable"]


# ---- activations: the formula against autograd's saved tensors ------------------------------------
def _saved_bytes(dtype: torch.dtype, layers: int, kinds: list[str], rows: bool, bs: int = 2, T: int = 16,
                 autocast: torch.dtype | None = None) -> int:
    """Bytes autograd saves in one forward of a tiny Qwen2's decoder with static LoRA (and per-row factors)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from metatuner.models.precision import enable_autocast

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=176, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval().requires_grad_(False)
    enable_autocast(model, autocast)
    lora = LoRAModel(model)
    sites = lora.add_adapter("s", kinds, range(layers), 8, 16.0)
    factors = None
    if rows:
        factors = {s.key: (torch.randn(bs, 4, lora.module(s).in_features, requires_grad=True),
                           torch.randn(bs, lora.module(s).out_features, 4, requires_grad=True)) for s in sites}
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *lora.model.parameters()]
            + [t for ab in (factors or {}).values() for t in ab]}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    ids = torch.randint(0, 97, (bs, T))
    with lora.use(("s",), factors, 2.0), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.get_decoder()(input_ids=ids, attention_mask=torch.ones_like(ids))
    return sum(seen.values())


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, None), (torch.bfloat16, torch.bfloat16),
                                            (torch.float32, torch.bfloat16)])  # train.autocast: auto, auto, bf16
@pytest.mark.parametrize("kinds,rows", [(["q_proj", "v_proj"], True),
                                        (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"], False)])
def test_layer_activation_formula_equals_what_autograd_saves(dtype, autocast, kinds, rows):
    bs, T = 2, 16
    saved = [_saved_bytes(dtype, n, kinds, rows, autocast=autocast) for n in (2, 3)]
    per_layer = (saved[1] - saved[0]) / (bs * T)
    widths = {"q_proj": 64, "k_proj": 64, "v_proj": 64, "o_proj": 64, "gate_proj": 64, "up_proj": 64,
              "down_proj": 176}
    weights = dtype.itemsize
    layer_mm = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 176  # q, o; k, v; gate, up, down
    shape = _Shape(h=64, q=64, kv=32, i=176, heads=4, vocab=97, layers=2, layer_mm=layer_mm, head_mm=0,
                   b=(autocast or dtype).itemsize, wb=weights, half_base=weights < 4)
    expected = shape.layer_bytes({k: (widths[k], 8 + (4 if rows else 0)) for k in kinds})
    assert expected + shape.cast_bytes() / (bs * T) == per_layer
    assert (shape.cast_bytes() > 0) == (autocast is not None and dtype == torch.float32)


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text", "gemma2", "phi3"])
def test_layer_activation_formula_follows_the_block_of_other_families(family):
    """Qwen3's and Gemma 3's q/k norms, Gemma's four norms, Gemma 2's eager attention, Phi-3's fused qkv_proj:
    the formula read off the block equals what autograd saves within 2% (bf16, one LoRA on the attention)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"pad_token_id": 0} if family == "phi3" else {"head_dim": 16}
    kind = "qkv_proj" if family == "phi3" else "q_proj"

    def saved(layers: int) -> tuple[int, nn.Module]:
        config = AutoConfig.for_model(family, hidden_size=64, intermediate_size=176, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=97, **extra)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval().requires_grad_(False)
        lora = LoRAModel(model)
        lora.add_adapter("s", [kind], range(layers), 8, 16.0)
        ids = torch.randint(0, 97, (2, 16))
        with lora.use(("s",)):
            _, n = _saved_during(lambda: model.get_decoder()(input_ids=ids, attention_mask=torch.ones_like(ids)),
                                 {p.untyped_storage().data_ptr() for p in model.parameters()})
        return n, model

    (two, _), (three, model) = saved(2), saved(3)
    shape = _Shape.of(model)
    assert shape.eager == (family == "gemma2")
    expected = shape.layer_bytes({kind: (64, 8)}, width=16)
    assert expected == pytest.approx((three - two) / 32, rel=0.02)


def _saved_during(fn, skip: set[int]) -> tuple[object, int]:
    """``fn()``'s result and the bytes autograd saved for its backward (tensors in ``skip`` left out)."""
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def test_the_passes_of_a_joint_step_hold_what_the_plan_says(tiny_tokenizer):
    """A real MetaTuner (tiny Qwen2, static LoRA): the meta encoder with F, and M's task pass with the
    generated rows, save what the plan's activation terms say for the same widths (within 5%)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from metatuner.evaluation.generation import encode_pairs
    from metatuner.models.plan import Lengths
    from metatuner.tasks import get_task
    from metatuner.training.build import build_metatuner

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tiny_tokenizer), tie_word_embeddings=True,
                         pad_token_id=tiny_tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    # features=all: the encoder runs every token of G's input, as the plan takes it (with features=query it
    # may run less: a prefix every row shares once, nothing after the query)
    cfg = load_config(None, ["train.batch_size=4", "generator.share_layers=2", "generator.features=all"])
    mt = build_metatuner(cfg, model, tiny_tokenizer)
    mt.add_static_adapter(cfg.train.static_rank, cfg.train.static_alpha)
    task = get_task("arithmetic")
    batch = task.load("test")[:4]
    skip = {p.untyped_storage().data_ptr() for p in mt.parameters()}

    factors, enc_bytes = _saved_during(lambda: mt.factors(mt.encode(task, batch)), skip)
    prompts = [task.instruction_for(ex) for ex in batch]
    _, task_bytes = _saved_during(lambda: mt.answer_nll(task, batch, prompts, factors), skip)

    g_width = mt.rewrite_batch(task, batch)[0]["input_ids"].shape[1]
    pairs = encode_pairs(tiny_tokenizer, mt.actor_inputs(task, batch, prompts),
                         [ex.target + tiny_tokenizer.eos_token for ex in batch], "cpu")
    m_width, answers = pairs["input_ids"].shape[1], int((pairs["labels"] != -100).sum())
    p = plan(cfg, config, lengths=Lengths(m=m_width, target=1, g=g_width, prompt=4))
    a = p.activation_parts
    log_softmax = 4 * config.vocab_size * answers  # what the output head keeps for the backward
    # F's rows (A, B) are saved where M uses them: the two passes are compared together
    assert enc_bytes + task_bytes - log_softmax == pytest.approx(a["encoder"] + a["hypernet"] + a["task"], rel=0.05)
    assert enc_bytes == pytest.approx(a["encoder"], rel=0.05)


# ---- memory, fits, FLOPs ------------------------------------------------------------------------------
def test_fits_checkpointing_and_data_parallel(qwen_configs, qwen_plans):
    cfg = load_config(None, ["model.dtype=bfloat16"])
    one, two = qwen_plans["7b"], plan(cfg, qwen_configs["7b"], devices=2)
    assert not one.checkpointing
    assert plan(load_config(None, ["train.gradient_checkpointing=true"]), qwen_configs["0.5b"]).checkpointing
    for p in (one, two):
        assert p.memory.activations_checkpointed < p.memory.activations
        for ckpt in (False, True):
            assert p.fits(ckpt) == {n: p.memory.total(ckpt) <= FIT_SHARE * g * GIB for n, g in CARDS.items()}
    # data parallel: each device holds all weights and optimizer state, and half the batch
    assert (two.batch, one.batch) == (2, 4)
    assert two.memory.weights == one.memory.weights and two.memory.optimizer == one.memory.optimizer
    assert two.memory.activations < one.memory.activations
    assert two.joint_flops() == pytest.approx(one.joint_flops() / 2, rel=0.02)
    with pytest.raises(MetatunerError, match="devices"):
        plan(cfg, qwen_configs["7b"], devices=0)


def test_task_flops_are_four_times_the_matmul_parameters_per_token(qwen_configs):
    """w/o P: no decoding, scoring or regularizer; the task pass is 4 x matmul params x tokens (frozen base:
    forward and backward to the inputs), plus the small LoRA terms, and checkpointing adds one forward."""
    cfg = load_config(None, ["model.dtype=bfloat16", "train.ablation=no_prompt"])
    p = plan(cfg, qwen_configs["0.5b"], tflops=100)
    assert set(p.step_flops) == {"encode", "hypernet", "task"}
    c = qwen_configs["0.5b"]
    h, i, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    layer = h * h * 2 + 2 * h * kv + 3 * h * i  # q, o; k, v; gate, up, down
    forward = 2 * (c.num_hidden_layers * layer * 4 * 512 + c.vocab_size * h * 4 * 128)  # 4 rows, 512 tokens, 128 answer
    assert p.step_flops["task"] == pytest.approx(2 * forward, rel=0.01)
    encoder = 2 * p.k * layer * 4 * 384
    assert p.recompute_flops == pytest.approx(forward + encoder, rel=1e-6)
    assert p.step_seconds() == pytest.approx(p.joint_flops() / 100e12)


def test_the_gpu_protocol_fits_one_h200():
    """configs/bench/gpu.yaml's MetaTuner-J cell (SmolLM2-135M in bf16, batch 16) on one 141 GB card."""
    from metatuner.bench.protocol import Protocol

    cfg = Protocol.load("gpu").config("gsm8k", "metatuner-j", 0)
    p = plan(cfg, load_model_config(str(DATA / "smollm2-135m" / "config.json")), tflops=400)
    assert (p.batch, p.dtype, p.phases["joint"][0] + p.phases["warm-up of M"][0] + p.phases["warm-up of G"][0]) == (
        16, "bfloat16", 60)
    assert p.fits()["141 GB"] and p.memory.total() < 10 * GIB
    # the protocol's header runs it with --workers 8 on one GPU: eight such cells still fit the card
    assert 8 * p.memory.total() <= FIT_SHARE * CARDS["141 GB"] * GIB
    assert p.params.m == 134_515_008 and abs(p.params.m - 135e6) / 135e6 < 0.01  # the default model, 135M


def test_a_separate_generator_is_counted_and_held_on_its_own(qwen_configs):
    g_config = str(DATA / "qwen2.5-0.5b" / "config.json")
    p = plan(load_config(None, ["model.dtype=bfloat16", f"generator.model={g_config}"]), qwen_configs["1.5b"])
    assert (p.params.m, p.params.g, p.params.g_shared) == (QWEN["1.5b"][1], QWEN["0.5b"][1], False)
    assert p.memory.weights == 2 * (QWEN["1.5b"][1] + QWEN["0.5b"][1])


def test_the_meta_build_allocates_nothing(qwen_configs):
    from metatuner.models.plan import build_meta

    mt = build_meta(load_config(None, ["model.dtype=bfloat16"]), qwen_configs["7b"])
    assert all(p.is_meta for p in mt.parameters()) and all(b.is_meta for b in mt.buffers())


# ---- the command -----------------------------------------------------------------------------------
def test_plan_command_prints_the_plan_offline(capsys):
    code = main(["plan", str(DATA / "qwen2.5-0.5b" / "config.json"), "model.dtype=bfloat16", "--tflops", "100"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "494,032,768" in out and "(shares M's weights)" in out and "at 100 TFLOP/s" in out
    assert "train.gradient_checkpointing=false" in out
    for card in CARDS:
        assert card in out


def test_plan_command_plans_a_protocol_cell(capsys):
    code = main(["plan", str(DATA / "qwen2.5-7b" / "config.json"), "--protocol", "gpu", "--tflops", "400"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "7,615,616,512" in out and "16 queries per device" in out and "(bfloat16)" in out
    assert "the run's 60 steps" in out


@pytest.mark.parametrize("model,message", [
    ("Qwen/Qwen2.5-7B-Instruct", "no model config for 'Qwen/Qwen2.5-7B-Instruct'"),  # the hub is off in tests
    ("missing/config.json", "no model config file missing/config.json"),
])
def test_an_unreachable_config_is_one_line(capsys, model, message):
    assert main(["plan", model]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_model_folder_reads_its_config_json_offline():
    c = load_model_config(str(DATA / "qwen2.5-7b"))
    assert (c.model_type, c.num_hidden_layers, c.tie_word_embeddings) == ("qwen2", 28, False)


def test_a_config_json_without_model_type_is_refused(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(MetatunerError, match="model_type"):
        load_model_config(str(bad))
