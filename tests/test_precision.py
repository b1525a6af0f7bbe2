"""A bf16 base trains: LoRA adapters and F stay float32 (so are their AdamW states), the LoRA terms are
computed in float32 and added to the bf16 activations, and forward passes run under autocast
(``train.autocast``). Tested on the CPU (bf16 runs there) against the same run in float32: the loss
curves of 20 steps agree within a stated tolerance (SFT, and the joint loss: task loss through the
encoder, F and the static LoRA plus G's regularizer), the weights move even at a learning rate of 1e-4,
per-row LoRA outputs and generation logits agree, and greedy generation gives the same tokens on most rows.

Gradient checkpointing (``train.gradient_checkpointing``): one training step keeps far fewer bytes for
the backward pass and gives every trainable parameter the same gradient; generation keeps its KV cache."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from conftest import make_model
from metatuner.config import load_config
from metatuner.evaluation.generation import generate
from metatuner.models.metatuner import MetaTuner
from metatuner.models.precision import autocast_dtype, autocast_of
from metatuner.models.recompute import gradient_checkpointing
from metatuner.tasks import get_task
from metatuner.training.build import build_metatuner
from metatuner.training.checkpoint import latest_checkpoint
from metatuner.training.predictor import MetaTunerPredictor
from metatuner.training.stream import DataStream
from metatuner.training.trainer import Trainer

ARGS = ["train.batch_size=2", "train.max_length=128", "train.warmup_ratio=0", "train.lr_schedule=constant",
        "data.val_size=0", "train.static_rank=4"]
#: the largest relative gap allowed between a step's bf16 and fp32 loss (bf16 keeps 8 bits of mantissa)
LOSS_TOLERANCE = 0.03


def build(tok, dtype, lr="0.05"):
    torch.manual_seed(0)
    model = make_model(tok, init_range=0.1).to(dtype)
    cfg = load_config(None, [*ARGS, f"train.lr_static={lr}", "train.steps=20"])
    torch.manual_seed(1)  # the adapters' initial values: alike in both dtypes
    mt = build_metatuner(cfg, model, tok)
    return cfg, mt


def sft_losses(tok, dtype, tmp_path, lr="0.05"):
    """20 steps of the SFT baseline's path (a static LoRA on M, :func:`~metatuner.training.sft.fine_tune`):
    the per-step losses and the static LoRA."""
    import json

    from metatuner.models.static import StaticLoRA
    from metatuner.training.sft import fine_tune

    cfg, mt = build(tok, dtype, lr)
    task = get_task("arithmetic")
    static = StaticLoRA.from_config(mt.actor, tok, cfg)
    run_dir = tmp_path / str(dtype)
    fine_tune(static, cfg, task, task.load("train")[:16], 20, run_dir, progress=False)
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r["sft_loss"] for r in log if "sft_loss" in r], static


def test_bf16_training_follows_the_fp32_loss_curve(tiny_tokenizer, tmp_path):
    fp32, _ = sft_losses(tiny_tokenizer, torch.float32, tmp_path)
    bf16, static = sft_losses(tiny_tokenizer, torch.bfloat16, tmp_path)
    assert len(fp32) == len(bf16) == 20 and fp32[-1] < 0.8 * fp32[0]  # it learns
    gaps = [abs(a - b) / a for a, b in zip(fp32, bf16)]
    assert max(gaps) < LOSS_TOLERANCE, gaps
    params = static.parameters()
    assert params and all(p.dtype == torch.float32 for p in params)
    assert next(static.model.parameters()).dtype == torch.bfloat16  # the base stays bf16


def test_bf16_weights_move_at_a_small_learning_rate(tiny_tokenizer, tmp_path):
    cfg, mt = build(tiny_tokenizer, torch.bfloat16, lr="1e-4")
    mt.add_static_adapter(cfg.train.static_rank, cfg.train.static_alpha)
    task = get_task("arithmetic")
    a = [p for n, p in zip(range(10**6), mt.m_lora.adapter_parameters("static"))][0]
    before = a.detach().clone()
    trainer = Trainer(cfg, mt, task, task.load("train")[:16], [], None, progress=False)
    trainer.setup_optimizer(2, {"static": list(mt.m_lora.adapter_parameters("static"))})
    trainer.warmup_actor(2)
    moved = (a.detach() != before).float().mean().item()
    assert moved > 0.9, f"only {moved:.0%} of A's entries moved"  # in bf16 storage, ~none would


def test_per_row_lora_and_generation_logits_in_bf16_agree_with_fp32(tiny_tokenizer):
    task = get_task("arithmetic")
    batch = task.load("test")[:3]
    outs = {}
    for dtype in (torch.float32, torch.bfloat16):
        cfg, mt = build(tiny_tokenizer, dtype)
        torch.manual_seed(2)
        with torch.no_grad():
            for p in mt.hypernet.parameters():  # non-zero B heads: the per-row terms matter
                p.normal_(0, 0.05)
            factors = mt.factors(mt.encode(task, batch))
            ids = tiny_tokenizer([ex.query for ex in batch], return_tensors="pt", padding=True)["input_ids"]
            with mt.as_actor(factors):
                outs[dtype] = mt.actor(ids).logits.float()
            base = mt.actor(ids).logits.float()
    ours, theirs = outs[torch.bfloat16], outs[torch.float32]
    assert (theirs - base.to(theirs)).abs().max() > 0.01  # the per-row LoRA changes the output
    scale = theirs.abs().max()
    assert (ours - theirs).abs().max() / scale < 0.02


# ---- autocast -----------------------------------------------------------------------------------------
#: the largest relative gap allowed between a joint step's loss terms in bf16 + autocast and in fp32 (measured:
#: 0.5%)
JOINT_TOLERANCE = 0.02
#: the largest gap allowed between bf16's and fp32's logits, relative to fp32's largest logit (measured: 3%)
LOGIT_TOLERANCE = 0.05
#: greedy decoding: rows (of 8) whose 8 new tokens must be the same as fp32's; a tiny random model has near
#: ties, where bf16 may pick the other token and the row then goes its own way
SAME_ROWS = 6


def joint_mt(tok, dtype, *overrides, layers=2):
    """A MetaTuner (G = M, k = 1) with a static LoRA and a non-zero F, alike in every dtype."""
    torch.manual_seed(0)
    model = make_model(tok, layers=layers, init_range=0.1).to(dtype)
    cfg = load_config(None, [*ARGS, "generator.share_layers=1", "hypernet.rank=2", "train.steps=20",
                             "train.lr_scale=10", *overrides])
    torch.manual_seed(1)
    mt = build_metatuner(cfg, model, tok)
    mt.add_static_adapter(cfg.train.static_rank, cfg.train.static_alpha)
    with torch.no_grad():
        torch.manual_seed(2)
        for p in [*mt.hypernet.parameters(), *mt.g_lora.adapter_parameters("dec")]:
            p.normal_(0, 0.05)  # F's LoRA and G's decoder matter from the first step
    return cfg, mt


def joint_run(tok, dtype, *overrides):
    """20 steps of the joint loss without rollouts: the task loss under p~ (meta encoder, F, static LoRA) plus
    G's regularizer on fixed expert outputs, stepped on the sum as MetaTuner-J does. Returns the per-step
    losses, the MetaTuner, the trainer and the parameters' starting values."""
    cfg, mt = joint_mt(tok, dtype, "train.batch_size=1", *overrides)
    task = get_task("arithmetic")
    train = task.load("train")[:16]
    trainer = Trainer(cfg, mt, task, train, [], None, progress=False)
    trainer.setup_optimizer(20)
    start = {name: [p.detach().clone() for p in ps] for name, ps in trainer.groups.items()}
    losses = []
    trainer.loop.log = lambda r: losses.append((r["task_loss"], r["reg_loss"])) if "task_loss" in r else None

    def loss(batch):
        experts = ["Add the numbers." for _ in batch]
        return {"task": trainer.p0_task_loss(batch), "reg": mt.prompt_nll(task, batch, experts).mean()}

    trainer.supervised("joint", "joint", 20, DataStream(train, 5), loss)
    return losses, mt, trainer, start


def test_autocast_is_on_for_a_half_precision_base_and_off_for_float32(tiny_tokenizer):
    assert autocast_dtype("auto", torch.bfloat16) is torch.bfloat16 and autocast_dtype("auto", torch.float32) is None
    assert autocast_dtype("bf16", torch.float32) is torch.bfloat16 and autocast_dtype("none", torch.float16) is None
    _, mt = joint_mt(tiny_tokenizer, torch.float32)
    model = mt.actor
    # a float32 base with the defaults runs its classes' own forwards: the committed results' code path
    assert autocast_of(model) is None
    assert not {"forward"} & (model.__dict__.keys() | model.get_decoder().__dict__.keys())
    ids = torch.tensor([[5, 6, 7, 8]])
    plain = model(ids).logits
    assert plain.dtype == torch.float32
    mt.set_precision("bf16")  # classic mixed precision on float32 weights
    with torch.no_grad():
        cast = model(ids).logits
    assert autocast_of(model) is torch.bfloat16 and cast.dtype == torch.bfloat16
    assert (cast.float() - plain).abs().max() < 0.02 * plain.abs().max()
    assert next(model.parameters()).dtype == torch.float32  # autocast casts copies, never the weights
    twin = copy.deepcopy(model)  # a deep copy autocasts too, with its own weights
    with torch.no_grad():
        twin.get_output_embeddings().weight.mul_(2)
        assert twin(ids).logits.dtype == torch.bfloat16 and not torch.equal(twin(ids).logits, cast)
    mt.set_precision("none")
    assert autocast_of(model) is None and "forward" not in model.__dict__ and torch.equal(model(ids).logits, plain)


def test_bf16_autocast_joint_training_follows_the_fp32_loss_curve(tiny_tokenizer):
    fp32, _, fp32_trainer, fp32_start = joint_run(tiny_tokenizer, torch.float32)
    bf16, mt, trainer, start = joint_run(tiny_tokenizer, torch.bfloat16)
    assert autocast_of(mt.actor) is torch.bfloat16 and next(mt.actor.parameters()).dtype == torch.bfloat16
    assert len(fp32) == len(bf16) == 20
    assert sum(t for t, _ in fp32[-5:]) < 0.95 * sum(t for t, _ in fp32[:5])  # the task loss falls
    gaps = [abs(a - b) / a for x, y in zip(fp32, bf16) for a, b in zip(x, y)]
    assert max(gaps) < JOINT_TOLERANCE, gaps

    def moved(params, before):
        return sum((p.detach() != s).sum().item() for p, s in zip(params, before)) / sum(p.numel() for p in params)

    for name, params in trainer.groups.items():  # encoder, decoder, hypernet, static: fp32, and they move as in fp32
        assert all(p.dtype == torch.float32 for p in params), name
        share = moved(params, start[name])
        assert share > 0.5 and share >= 0.95 * moved(fp32_trainer.groups[name], fp32_start[name]), (name, share)
    states = [v for st in trainer.optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.dim()]
    assert states and all(v.dtype == torch.float32 for v in states)  # AdamW's moments


def test_greedy_generation_in_bf16_with_autocast_agrees_with_fp32(tiny_tokenizer):
    task = get_task("arithmetic")
    batch = task.load("test")[:8]
    answers, logits = {}, {}
    for dtype, mode in ((torch.float32, "auto"), (torch.bfloat16, "auto"), (torch.float32, "bf16")):
        torch.manual_seed(0)
        model = make_model(tiny_tokenizer, init_range=0.2).to(dtype)
        cfg = load_config(None, ["generator.share_layers=2", f"train.autocast={mode}"])
        torch.manual_seed(1)
        mt = build_metatuner(cfg, model, tiny_tokenizer)
        with torch.no_grad():
            torch.manual_seed(2)
            for p in mt.hypernet.parameters():
                p.normal_(0, 0.05)  # the per-row LoRA changes the answers
        mt.use_prompt = False
        answers[dtype, mode] = [p.output for p in MetaTunerPredictor(mt).predict(task, batch, 8)]
        ids = tiny_tokenizer([ex.query for ex in batch], return_tensors="pt", padding=True)["input_ids"]
        with torch.no_grad(), mt.as_actor(mt.factors(mt.encode(task, batch))):
            logits[dtype, mode] = mt.actor(ids).logits.float()
    ref = answers[torch.float32, "auto"]
    assert len(set(ref)) > 4  # varied answers: agreement is not a model that says one thing
    for key in ((torch.bfloat16, "auto"), (torch.float32, "bf16")):
        same = sum(a == b for a, b in zip(ref, answers[key]))
        assert same >= SAME_ROWS, (key, same, ref, answers[key])
        gap = (logits[key] - logits[torch.float32, "auto"]).abs().max() / logits[torch.float32, "auto"].abs().max()
        assert gap < LOGIT_TOLERANCE, (key, gap)


# ---- gradient checkpointing -----------------------------------------------------------------------------
def one_step(mt, task, batch):
    """The trained passes of a joint step (encoder, F, M's task loss with static and per-row LoRA, G's
    regularizer), backward included; returns the bytes of the distinct storages kept for the backward pass
    (parameters left out) and every trainable parameter's gradient."""
    params = {p.untyped_storage().data_ptr() for p in mt.parameters()}
    params |= {p.untyped_storage().data_ptr() for p in mt.actor.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            kept[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        factors = mt.factors(mt.encode(task, batch))
        loss = mt.answer_nll(task, batch, [task.instruction_for(ex) for ex in batch], factors).mean()
        loss = loss + mt.prompt_nll(task, batch, ["Add the numbers." for _ in batch]).mean()
    loss.backward()
    grads = {f"{name}.{i}": p.grad for name, ps in mt.parameter_groups().items() for i, p in enumerate(ps)}
    return sum(kept.values()), grads


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def checkpointed(request, tiny_tokenizer):
    """One step of a 4-layer model (k = 2), without and with gradient checkpointing: {flag: (mt, bytes, grads)}.
    One query: with several, ``encode`` without checkpointing may run their shared prefix once, which checkpointing
    (it drops caches) cannot, and the two would then differ by bf16's rounding of another computation order."""
    task = get_task("arithmetic")
    batch = task.load("train")[:1]
    out = {}
    for flag in (False, True):
        _, mt = joint_mt(tiny_tokenizer, request.param, "generator.share_layers=2",
                         f"train.gradient_checkpointing={str(flag).lower()}", layers=4)
        # the encoder runs the rows' shared prefix once unless blocks are checkpointed: both run it per row here,
        # so the two steps do the same arithmetic (in bf16 the shared prefix rounds differently)
        mt.MIN_SHARED_PREFIX = 10**9
        out[flag] = (mt, *one_step(mt, task, batch))
    return out


def test_gradient_checkpointing_keeps_less_for_backward_and_the_same_gradients(checkpointed):
    (plain, plain_bytes, plain_grads), (ckpt, ckpt_bytes, ckpt_grads) = checkpointed[False], checkpointed[True]
    assert gradient_checkpointing(ckpt.actor) and not gradient_checkpointing(plain.actor)
    assert ckpt_bytes < 0.25 * plain_bytes, (ckpt_bytes, plain_bytes)  # measured: 1/10 to 1/21
    assert plain_grads.keys() == ckpt_grads.keys() and len(plain_grads) > 8
    assert all(g is not None for g in ckpt_grads.values())  # every trainable parameter, the encoder's too
    for name, g in plain_grads.items():
        assert torch.allclose(ckpt_grads[name], g, rtol=1e-5, atol=1e-7), name


def test_a_second_metatuner_on_a_checkpointed_base_replays_its_own_adapters(tiny_tokenizer):
    cfg, first = joint_mt(tiny_tokenizer, torch.float32, "train.gradient_checkpointing=true")
    hyper = dataclasses.replace(cfg.hypernet, targets=["q_proj", "v_proj", "o_proj"])  # wraps o_proj too
    second = MetaTuner(first.actor, tiny_tokenizer, cfg.generator, hyper)
    second.set_precision(gradient_checkpointing=True)
    with torch.no_grad():
        for p in second.hypernet.parameters():
            p.normal_(0, 0.05)
    _, grads = one_step(second, get_task("arithmetic"), get_task("arithmetic").load("train")[:1])
    assert all(g is not None for g in grads.values())  # replaying the first one's adapters raised in backward


def test_gradient_checkpointing_leaves_generation_and_its_cache_alone(checkpointed, tiny_tokenizer):
    texts = ["12 + 7 =", "What is 3 times 4?"]
    results = {}
    for flag, (mt, _, _) in checkpointed.items():
        lengths = []
        hook = mt.actor.get_decoder().register_forward_pre_hook(
            lambda m, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
        try:
            results[flag] = [g.text for g in generate(mt.actor, tiny_tokenizer, texts, 6)]
        finally:
            hook.remove()
        assert len(lengths) == 6 and lengths[1:] == [1] * 5  # one prefill, then one new token per step: the cache
    assert results[True] == results[False]


# ---- fp16: loss scaling --------------------------------------------------------------------------------
def unscaled_gradients(tok, dtype, scaler_on: bool = True, run_dir=None):
    """One step of the task loss times 1e-8 (gradients far below fp16's smallest number): the trainer, and the
    gradients it clips and steps on, after unscaling."""
    cfg, mt = joint_mt(tok, dtype, "train.batch_size=1")
    task = get_task("arithmetic")
    trainer = Trainer(cfg, mt, task, task.load("train")[:4], [], run_dir, progress=False)
    if not scaler_on:
        trainer.scaler = torch.amp.GradScaler("cpu", enabled=False)
    trainer.setup_optimizer(1)
    seen, clip = [], trainer.loop.clip
    trainer.loop.clip = lambda params: (seen.extend(p.grad.clone() for p in params if p.grad is not None), clip(params))
    trainer.supervised("joint", "task", 1, DataStream(trainer.train_set, 5), lambda b: 1e-8 * trainer.p0_task_loss(b))
    return trainer, torch.cat([g.flatten() for g in seen])


def test_fp16_scales_the_loss_so_small_gradients_survive(tiny_tokenizer, tmp_path):
    trainer, fp16 = unscaled_gradients(tiny_tokenizer, torch.float16, run_dir=tmp_path)
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() > 1
    _, fp32 = unscaled_gradients(tiny_tokenizer, torch.float32)
    assert (fp16 - fp32).norm() < 0.05 * fp32.norm() and fp32.norm() > 0
    _, flushed = unscaled_gradients(tiny_tokenizer, torch.float16, scaler_on=False)
    assert flushed.norm() < 0.01 * fp32.norm()  # without scaling, fp16 flushes them to zero
    bf16_trainer, _ = unscaled_gradients(tiny_tokenizer, torch.bfloat16)
    assert not bf16_trainer.scaler.is_enabled()  # bf16 has float32's range: no scaling
    # the scale is part of a checkpoint: a resume continues with it
    trainer.scaler.update(1024.0)
    trainer.save()
    resumed, _ = unscaled_gradients(tiny_tokenizer, torch.float16)
    resumed.restore(latest_checkpoint(tmp_path))
    assert resumed.scaler.get_scale() == 1024.0


@pytest.mark.parametrize("actor,generator", [("phi3", None), ("qwen2", "mistral")])
def test_gradient_checkpointing_on_other_families(tiny_tokenizer, actor, generator):
    """Phi-3's fused qkv_proj, and G and M of two families (two bases, each replaying its own adapters)."""
    from test_families import build

    task = get_task("arithmetic")
    steps = {}
    for flag in (False, True):
        _, mt = build(tiny_tokenizer, actor, generator)
        mt.add_static_adapter(4, 8)
        with torch.no_grad():
            torch.manual_seed(2)
            for p in [*mt.hypernet.parameters(), *mt.g_lora.adapter_parameters("dec")]:
                p.normal_(0, 0.05)
        mt.set_precision(gradient_checkpointing=flag)
        steps[flag] = one_step(mt, task, task.load("train")[:1])
    (plain_bytes, plain), (ckpt_bytes, ckpt) = steps[False], steps[True]
    assert ckpt_bytes < 0.25 * plain_bytes  # measured: about 1/8 for one query of these 2-layer models
    for name, g in plain.items():
        assert ckpt[name] is not None and torch.allclose(ckpt[name], g, rtol=1e-5, atol=1e-7), name
