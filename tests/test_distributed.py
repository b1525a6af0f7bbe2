"""`metatuner train` with two CPU processes (``torchrun``; accelerate joins them over gloo): each process
takes half of every batch, so two processes must train the same weights as one process on the whole batch.
(On a CPU, ``accelerate launch --num_processes 2`` starts one process; ``torchrun`` starts two.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from metatuner.training.checkpoint import latest_checkpoint, read_trainable



def _train(model_dir, out: Path, processes: int, *overrides: str) -> None:
    cli = ["-m", "metatuner.cli", "train", "--model", str(model_dir), "--task", "arithmetic", "--no-eval",
           "--out", str(out), "data.train_limit=24", "data.val_size=0", "train.batch_size=4",
           "generator.max_prompt_tokens=6", *overrides]
    if processes == 1:
        cmd = [sys.executable, *cli]
    else:
        # --standalone: the launcher's store binds a free port itself (a port picked here and passed on could be
        # taken by another test's process before the launcher binds it)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               *cli]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _state(run: Path):
    return read_trainable(latest_checkpoint(run))


def test_two_processes_train_the_same_weights_as_one(tiny_model_dir, tmp_path):
    # no prompt branch: no sampling, so the two runs see identical batches and must agree to float error;
    # the actor warm-up (a static LoRA) and the LR schedule are covered too
    args = ("train.ablation=no_prompt", "train.steps=3", "train.actor_warmup_steps=2", "train.lr_hypernet=1e-2",
            "train.lr_static=1e-2", "train.save_every=1")
    _train(tiny_model_dir, tmp_path / "one", 1, *args)
    _train(tiny_model_dir, tmp_path / "two", 2, *args)
    (one, s1), (two, s2) = _state(tmp_path / "one"), _state(tmp_path / "two")
    assert s1["step"] == s2["step"] == 3 and one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-3, atol=1e-4, msg=name)  # float noise ~1e-5; unsynced: ~5e-2
    before, _ = read_trainable(tmp_path / "one" / "checkpoints" / "step-000002")
    assert any(not torch.equal(before[name], one[name]) for name in one)  # the last step did move weights


def test_two_processes_gather_every_expert_prompt(tiny_model_dir, tmp_path):
    _train(tiny_model_dir, tmp_path / "run", 2, "train.steps=2", "train.rollouts=2", "train.save_every=2",
           "train.actor_warmup_steps=0", "train.generator_warmup_queries=0", "train.rollout_every=1")
    _, state = _state(tmp_path / "run")
    # two steps of batch 4, rollouts every step: 8 queries, half on each process, all in the checkpoint
    assert len(state["extra"]["experts"]) == 8
    # frozen-decoder prompts: every trained query's, plus those decoded ahead for the rest of the sync window
    assert {qid for qid, _ in state["extra"]["experts"]} <= set(state["extra"]["prompt_cache"])


def test_commands_other_than_train_refuse_several_processes(monkeypatch, capsys):
    from metatuner.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["eval", "--task", "arithmetic"]) == 2
    assert "runs in one process, not 2" in capsys.readouterr().err
