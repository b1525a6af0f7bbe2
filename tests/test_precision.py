"""A bf16 base trains: LoRA adapters and F stay float32 (so are their AdamW states), the LoRA terms are
computed in float32 and added to the bf16 activations. Tested on the CPU (bf16 runs there) against the
same run in float32: the loss curves of 20 steps agree within a stated tolerance, the weights move even
at a learning rate of 1e-4, and per-row LoRA outputs and generation logits agree."""

from __future__ import annotations

import torch

from conftest import make_model
from metatuner.config import load_config
from metatuner.tasks import get_task
from metatuner.training.build import build_metatuner
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
    cfg, mt = build(tok, dtype, lr)
    task = get_task("arithmetic")
    trainer = Trainer(cfg, mt, task, task.load("train")[:16], [], None, progress=False)
    losses = []
    trainer.log = lambda record: losses.append(record["sft_loss"]) if "sft_loss" in record else None
    start = {k: v.detach().clone() for k, v in mt.m_lora.adapter_state("static").items()} if mt.has_static else None
    trainer.warmup_actor(20)
    return losses, mt, start


def test_bf16_training_follows_the_fp32_loss_curve(tiny_tokenizer, tmp_path):
    fp32, _, _ = sft_losses(tiny_tokenizer, torch.float32, tmp_path)
    bf16, mt, _ = sft_losses(tiny_tokenizer, torch.bfloat16, tmp_path)
    assert len(fp32) == len(bf16) == 20 and fp32[-1] < 0.8 * fp32[0]  # it learns
    gaps = [abs(a - b) / a for a, b in zip(fp32, bf16)]
    assert max(gaps) < LOSS_TOLERANCE, gaps
    params = list(mt.m_lora.adapter_parameters("static"))
    assert params and all(p.dtype == torch.float32 for p in params)
    assert next(mt.actor.parameters()).dtype == torch.bfloat16  # the base stays bf16


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
