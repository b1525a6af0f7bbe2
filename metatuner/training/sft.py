"""Supervised fine-tuning of a static LoRA on M: the SFT baseline, and BetterTogether's w steps.

:func:`fine_tune` trains a fresh :class:`~metatuner.models.static.StaticLoRA` adapter on
(instruction, x) -> y with the one supervised loop (:class:`~metatuner.training.supervised.SupervisedLoop`):
``train.batch_size`` examples per step from a stream seeded ``data.seed + 1``, the mean NLL of the gold
targets, AdamW at ``train.lr_static`` under ``train.lr_schedule`` over the given steps. It is exactly
MetaTuner's warm-up of M (:meth:`Trainer.warmup_actor <metatuner.training.trainer.Trainer.warmup_actor>`),
logged the same way (phase ``warmup_actor``, ``sft_loss``, ``lr_static``).

A stop request (SIGTERM / SIGINT) between two steps saves a checkpoint holding the adapter as
``static.<site>.A`` / ``.B`` (the names a MetaTuner checkpoint gives M's static LoRA, so either loads into a
:class:`StaticLoRA`) and the data position, then stops; with ``save_every`` one is also saved every that
many steps. ``resume`` continues from the newest one bit for bit (the SFT baseline's grid cells resume so).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from metatuner.config import RunConfig
from metatuner.models.precision import needs_loss_scaling
from metatuner.models.static import Render, StaticLoRA
from metatuner.tasks.base import Example, Task
from metatuner.training.stream import DataStream
from metatuner.training.supervised import SupervisedLoop


def fine_tune(static: StaticLoRA, cfg: RunConfig, task: Task, train: list[Example], steps: int,
              run_dir: Path | None, *, instruction: str | None = None, render: Render | None = None,
              on_step: Callable[[int], None] | None = None, progress: bool = True, save_every: int = 0,
              resume: bool = False) -> SupervisedLoop:
    """Resets ``static``'s adapter and fine-tunes it for ``steps`` steps on ``train``; returns the loop (its
    ``trainable_params()`` and ``step``).

    Args:
        static: M and its static LoRA slot.
        cfg: the run config (``train.*``: learning rate, schedule, batch size, ``max_length``; ``data.seed``).
        task: renders each example and gives its instruction p~.
        train: the (query, target) examples to fit.
        steps: optimizer steps, the schedule's whole length.
        run_dir: where ``log.jsonl`` (appended to) and a stop's checkpoint go (None: nowhere).
        instruction: the instruction of every input (default: each example's p~).
        render: how an input is rendered (default: ``static``'s own; BetterTogether puts its demos in).
        on_step: called with the step count after every optimizer step, and with 0 before the first.
        progress: a progress bar.
        save_every: also save a checkpoint every this many steps (0: only when stopped).
        resume: continue from the newest checkpoint in ``run_dir`` (optimizer, schedule, RNGs, data position and
            log restored; ``on_step`` is not called again for the steps already taken).
    """
    tc = cfg.train
    loop = SupervisedLoop(tc, run_dir, device_type=static.model.device.type,
                          loss_scaling=needs_loss_scaling(static.model), progress=progress)
    static.reset()
    loop.setup(steps, static.parameter_groups())
    loop.on_step = on_step
    stream = DataStream(train, cfg.data.seed + 1)
    loop.save = lambda: loop.save_checkpoint(static.state(), {"has_static": True, "cursor": stream.cursor})
    loop.save_every = save_every
    if resume:
        tensors, extra = loop.restore(loop.latest_checkpoint())
        static.load_state(tensors)
        stream.cursor = extra["cursor"]
    else:
        loop.at_step()

    def loss(batch: list[Example]) -> torch.Tensor:
        prompts = [instruction or task.instruction_for(ex) for ex in batch]
        return static.answer_nll(task, batch, prompts, tc.max_length, render).mean()

    loop.run("warmup_actor", "sft", steps, stream, loss, start=loop.step)
    return loop
