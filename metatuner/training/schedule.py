"""The one learning-rate policy every trained method follows (SFT, DPO, BetterTogether's w steps, MetaTuner).

A linear warm-up over ``round(warmup_ratio * total)`` optimizer steps, then ``constant``, ``linear``
decay to zero or ``cosine`` decay to zero, over the method's *whole* budget of ``total`` steps. It is
``transformers.get_scheduler`` with the names and warm-up length below, so a method trained through
the Hugging Face ``Trainer`` (TRL's DPO) gets exactly the same multipliers as our own loops:

>>> from metatuner.config import TrainConfig
>>> hf_schedule(TrainConfig(lr_schedule="cosine", warmup_ratio=0.1), 60)
('cosine', 6)

MetaTuner runs its phases (warm-up of M, warm-up of G, joint training) under one schedule over the
sum of their steps, so its static LoRA sees the learning rates an SFT run of the same budget sees.
"""

from __future__ import annotations

import torch

HF_NAMES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def hf_schedule(tc, total: int) -> tuple[str, int]:
    """``(transformers scheduler name, warm-up steps)`` for ``tc.lr_schedule`` over ``total`` steps."""
    return HF_NAMES[tc.lr_schedule], round(tc.warmup_ratio * total)


def make_scheduler(optimizer: torch.optim.Optimizer, tc, total: int):
    """The scheduler of :func:`hf_schedule` on ``optimizer`` (one ``step()`` per optimizer step)."""
    from transformers import get_scheduler

    name, warmup = hf_schedule(tc, total)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max(1, total))
