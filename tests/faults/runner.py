"""Runs the ``metatuner`` CLI in processes forked from a preloaded server, so that a test can kill one with
SIGKILL (or signal it) at any moment, tens of times, without paying Python's and torch's start-up each
time. Everything the CLI needs is imported here, once, by the fork server (``multiprocessing``'s
``forkserver``: children are forked from a clean process, never from pytest's).

A child can also kill itself at the ``n``-th file operation of a checkpoint save (a write, fsync,
rename or link): a crash at an exact point of the write protocol.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import torch

from metatuner import files
from metatuner.training import checkpoint, supervised

#: everything a command imports, also lazily, imported once by the fork server. Named modules, not this one:
#: the server (Python 3.11) does not take its parent's ``sys.path``, so it cannot import ``faults.runner``
#: (under tests/) and would skip it silently, leaving every child to import torch afresh (seconds each)
PRELOAD = [
    "torch", "accelerate", "peft", "transformers", "transformers.optimization", "torch.utils.tensorboard",
    "transformers.models.llama.modeling_llama", "metatuner.api", "metatuner.bench.grid", "metatuner.cli",
    "metatuner.evaluation.harness", "metatuner.methods", "metatuner.recipes", "metatuner.training.predictor",
    "metatuner.training.trainer",
]

_CONTEXT = None


def context():
    """The forkserver context, its server preloaded with :data:`PRELOAD`."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
    return _CONTEXT


def _kill_at_checkpoint_op(n: int) -> None:
    """Counts file operations inside checkpoint saves; SIGKILLs this process at the ``n``-th one."""
    state = {"saving": False, "ops": 0}

    def counted(fn):
        def op(*args, **kwargs):
            if state["saving"]:
                state["ops"] += 1
                if state["ops"] == n:
                    os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)
        return op

    files._write_all = counted(files._write_all)
    for name in ("rename", "replace", "link", "fsync"):
        setattr(os, name, counted(getattr(os, name)))
    real_save = checkpoint.save_checkpoint

    def save(*args, **kwargs):
        state["saving"] = True
        try:
            return real_save(*args, **kwargs)
        finally:
            state["saving"] = False

    supervised.save_checkpoint = save  # where every training loop saves its checkpoints


def _child(argv: list[str], cwd: str, log: str, kill_at_op: int | None) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.chdir(cwd)
    torch.set_num_threads(1)
    if kill_at_op is not None:
        _kill_at_checkpoint_op(kill_at_op)
    from metatuner.cli import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Child:
    """One ``metatuner`` command in a forked process; its stdout and stderr go to ``log``."""

    def __init__(self, argv: list[str], cwd: Path, log: Path, kill_at_op: int | None = None):
        self.log = Path(log)
        self.process = context().Process(target=_child, args=(list(argv), str(cwd), str(log), kill_at_op))
        self.started = time.perf_counter()
        self.process.start()

    def wait(self, timeout: float) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()
            raise AssertionError(f"metatuner did not finish within {timeout}s; log:\n{self.output()}")
        return self.process.exitcode

    def kill_after(self, seconds: float) -> bool:
        """SIGKILLs the process ``seconds`` after its start; False when it had already finished."""
        self.process.join(max(0.0, self.started + seconds - time.perf_counter()))
        if self.process.exitcode is not None:
            return False
        self.process.kill()
        self.process.join()
        return True

    def signal_after(self, signum: int, seconds: float) -> bool:
        self.process.join(max(0.0, self.started + seconds - time.perf_counter()))
        if self.process.exitcode is not None:
            return False
        os.kill(self.process.pid, signum)
        return True

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""
