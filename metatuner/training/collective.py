"""What the training processes agree on under ``accelerate launch`` / ``torchrun``: averaged gradients and
whether to stop. With one process both are no-ops."""

from __future__ import annotations

import torch


def average_gradients(acc, params: list[torch.Tensor]) -> None:
    """Averages gradients across processes with one all-reduce of a flat buffer.

    A parameter's gradient is the mean over the processes that produced one (a process whose share had
    no expert prompt yet gives the decoder none), and stays ``None`` where none did, as in one process.
    Every process calls this with the same parameters, so the collective never waits on a missing one.
    """
    if acc.num_processes == 1:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
    present = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
    flat = acc.reduce(torch.cat([*grads, present]), reduction="sum")
    counts = flat[-len(params):]
    offset = 0
    for p, count in zip(params, counts.tolist()):
        n = p.numel()
        if count > 0:
            p.grad = (flat[offset : offset + n] / count).view_as(p).to(p.dtype)
        offset += n


def agreed_signal(acc, signum: int | None) -> int:
    """The signal any process received (0: none): every process stops at the same step, or the next
    collective would wait forever for the ones that stopped."""
    signum = signum or 0
    if acc.num_processes > 1:
        signum = int(acc.reduce(torch.tensor([signum], device=acc.device), reduction="max").item())
    return signum
