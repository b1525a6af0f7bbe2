"""The prompt branch retires itself when its evidence says it cannot help (``train.prompt_branch=auto``).

Rollout rewards are scripted (p~ always wins, or G's outputs always win), so the evidence is known. A
branch retired after G's warm-up rollouts must leave a run identical to w/o P's, weight for weight; one
whose outputs win must stay; joint-phase rollouts and a closed validation gate retire it too; ``always`` never
retires; and a resume on either side of the decision continues bit for bit.
"""

from __future__ import annotations

import json
import signal

import pytest
import torch

from metatuner.training.branch import PromptBranch
from metatuner.training.trainer import Trainer
from conftest import script_validation_scores
from test_training import assert_resume_matches, log_without_timing, setup

WARMUP = ["train.steps=8", "train.actor_warmup_steps=2", "train.generator_warmup_queries=4",
          "train.generator_warmup_steps=2", "train.lr_hypernet=0.01", "train.lr_static=0.01", "train.rollout_every=2"]
JOINT = ["train.steps=8", "train.actor_warmup_steps=2", "train.generator_warmup_queries=0", "train.retire_window=4",
         "train.lr_hypernet=0.01", "train.lr_static=0.01", "train.save_every=2"]


def scripted_rewards(monkeypatch, g_wins: bool) -> None:
    """G writes "Work carefully." for every query; rollout rewards: p~ scores 0 and every other prompt -1
    (or +1 when ``g_wins``)."""
    from metatuner.evaluation.generation import Generation
    from metatuner.models.metatuner import MetaTuner

    def outputs(self, task, examples, *, sample=False, n=1, temperature=1.0, frozen=False):
        return [Generation("Work carefully.", 3) for _ in examples for _ in range(n)]

    monkeypatch.setattr(MetaTuner, "generate_outputs", outputs)
    monkeypatch.setattr(MetaTuner, "generate_mixed", lambda self, task, sampled, n, temperature, greedy: (
        outputs(self, task, sampled, n=n), outputs(self, task, greedy)))

    def score(mt, task, examples, prompts, factors, reward, max_length, groups=None):
        other = 1.0 if g_wins else -1.0
        return torch.tensor([0.0 if p == task.instruction_for(ex) else other for ex, p in zip(examples, prompts)])

    monkeypatch.setattr("metatuner.training.rollouts.score_prompts", score)


def train(tok, tmp_path, name, overrides, val=0):
    cfg, mt, task, train_set = setup(tok, overrides, n_train=8 + val)
    Trainer(cfg, mt, task, train_set[:8], train_set[8:], tmp_path / name, progress=False).run()
    return mt, log_without_timing(tmp_path / name)


def test_the_decision_rules():
    b = PromptBranch("auto", below=0.25, window=4)
    b.record_warmup(1, 4)
    assert b.after_warmup() is None  # 25% is not below 25%
    b.record_warmup(0, 4)
    assert b.after_warmup() == "1 of 8 warm-up queries improved on p~"
    b.record_rollout(0, 2)
    assert b.after_rollouts() is None  # fewer queries than the window yet
    b.record_rollout(1, 2)
    assert b.after_rollouts() is None  # 1 of 4
    b.record_rollout(0, 2)
    assert b.after_rollouts() is None and b.recent == [[1, 2], [0, 2]]  # the window slides: still 1 of 4
    b.record_rollout(0, 2)
    assert b.after_rollouts() == "0 of the last 4 rolled-out queries improved on p~"
    assert b.at_gate("initial", 0.4, 0.5).startswith("the validation gate served p~")
    assert b.at_gate("generated", 0.6, 0.5) is None
    on = PromptBranch("always", below=0.25, window=4)
    on.record_warmup(0, 8), on.record_rollout(0, 8)
    assert on.after_warmup() is on.after_rollouts() is on.at_gate("initial", 0, 1) is None


@pytest.mark.parametrize("schedule", ["joint", "alternate"])
def test_a_branch_retired_at_warm_up_leaves_exactly_the_w_o_p_run(tiny_tokenizer, tmp_path, monkeypatch, schedule):
    scripted_rewards(monkeypatch, g_wins=False)
    mt, log = train(tiny_tokenizer, tmp_path, "auto", [*WARMUP, f"train.schedule={schedule}"])
    [decision] = [r for r in log if r["phase"] == "prompt_branch"]
    assert decision["message"] == "prompt branch retired at step 2: 0 of 4 warm-up queries improved on p~"
    joint = [r for r in log if r["phase"] == "joint"]
    assert len(joint) == 6 and not any("reg_loss" in r or "improved" in r for r in joint)  # no G at all
    assert not any(r["phase"] == "warmup_generator" and "generator_sft_loss" in r for r in log)
    assert mt.use_prompt is False and mt.serve_generated is False

    w_o_p, _ = train(tiny_tokenizer, tmp_path, "wop", [*WARMUP, "train.ablation=no_prompt"])
    ours, theirs = mt.trainable_state(), w_o_p.trainable_state()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    state = json.loads((tmp_path / "auto" / "checkpoints" / "step-000008" / "state.json").read_text())
    assert state["extra"]["prompt_branch"]["retired"] == {"step": 2, "reason": "0 of 4 warm-up queries improved on p~"}


def test_always_never_retires_and_a_helpful_branch_stays(tiny_tokenizer, tmp_path, monkeypatch):
    scripted_rewards(monkeypatch, g_wins=False)
    _, log = train(tiny_tokenizer, tmp_path, "on", [*WARMUP, "train.prompt_branch=always"])
    assert not any(r["phase"] == "prompt_branch" for r in log)
    assert all("reg_loss" in r for r in log if r["phase"] == "joint")
    scripted_rewards(monkeypatch, g_wins=True)
    mt, log = train(tiny_tokenizer, tmp_path, "helps", WARMUP)
    assert not any(r["phase"] == "prompt_branch" for r in log) and mt.use_prompt
    assert all("reg_loss" in r for r in log if r["phase"] == "joint")
    assert sum(r.get("improved", 0) for r in log) > 0


def test_joint_rollouts_that_never_improve_retire_the_branch(tiny_tokenizer, tmp_path, monkeypatch):
    scripted_rewards(monkeypatch, g_wins=False)
    mt, log = train(tiny_tokenizer, tmp_path, "joint", JOINT)
    [decision] = [r for r in log if r["phase"] == "prompt_branch"]
    # rollouts on every joint step from step 3 (2 queries each): steps 3 and 4 have rolled out 4 queries
    assert decision == {"phase": "prompt_branch", "step": 4, "decision": "retired",
                        "reason": "0 of the last 4 rolled-out queries improved on p~",
                        "message": "prompt branch retired at step 4: 0 of the last 4 rolled-out queries improved on p~"}
    after = [r for r in log if r["phase"] == "joint" and r["step"] > 4]
    assert len(after) == 4 and not any("reg_loss" in r or "improved" in r for r in after)


def test_a_closed_gate_at_a_validation_retires_the_branch(tiny_tokenizer, tmp_path, monkeypatch):
    scripted_rewards(monkeypatch, g_wins=True)  # rollouts alone would keep the branch
    script_validation_scores(monkeypatch, generated=0.25, initial=0.5)
    _, log = train(tiny_tokenizer, tmp_path, "gate", [*JOINT, "train.eval_every=4"], val=4)
    [decision] = [r for r in log if r["phase"] == "prompt_branch"]
    assert decision["step"] == 4 and decision["reason"].startswith("the validation gate served p~ (score 0.250")
    final = [r for r in log if r["phase"] == "eval"][-1]
    assert final["gate"] == "retired" and final["prompt_branch"] == decision["message"]


@pytest.fixture(scope="module")
def straight_joint(tiny_tokenizer, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        scripted_rewards(mp, g_wins=False)
        mt, log = train(tiny_tokenizer, tmp_path_factory.mktemp("straight"), "run", JOINT)
    return {k: v.clone() for k, v in mt.trainable_state().items()}, log


@pytest.mark.parametrize("stop_after", [3, 6])  # before and after the retirement at step 4
def test_resume_on_either_side_of_the_decision_is_bit_identical(tiny_tokenizer, tmp_path, monkeypatch,
                                                                 straight_joint, stop_after):
    from metatuner import interrupts

    scripted_rewards(monkeypatch, g_wins=False)
    cfg, mt, task, train_set = setup(tiny_tokenizer, JOINT)
    trainer = Trainer(cfg, mt, task, train_set, [], tmp_path, progress=False)
    with monkeypatch.context() as m:
        m.setattr(interrupts, "requested", lambda: signal.SIGTERM if trainer.step >= stop_after else None)
        with pytest.raises(interrupts.Stopped):
            trainer.run()
    assert_resume_matches(tiny_tokenizer, tmp_path, JOINT, straight_joint)


def test_the_report_names_the_retirement(tiny_tokenizer, tmp_path, monkeypatch):
    from metatuner.bench.logs import diagnostics_table

    scripted_rewards(monkeypatch, g_wins=False)
    train(tiny_tokenizer, tmp_path, "run", JOINT, val=2)
    table = diagnostics_table([{"method": "metatuner-j", "task": "arithmetic", "train_log": "run/log.jsonl"}], tmp_path)
    assert "| metatuner-j | arithmetic |" in table and table.rstrip().endswith("| retired at step 4 x1 |")


def test_rollout_queries_rolls_out_only_the_first_queries_of_each_batch(tiny_tokenizer, tmp_path, monkeypatch):
    scripted_rewards(monkeypatch, g_wins=True)
    cfg, mt, task, train_set = setup(tiny_tokenizer, [*JOINT, "train.rollout_queries=1", "train.prompt_branch=always"])
    trainer = Trainer(cfg, mt, task, train_set, [], tmp_path, progress=False)
    trainer.run()
    joint = [r for r in log_without_timing(tmp_path) if r["phase"] == "joint"]
    assert len(joint) == 6 and [r["rolled_out"] for r in joint] == [1] * 6  # of batches of 2
    # 6 steps x 2 queries cover all 8 training queries; one rolled out per step reaches at most 6 of them
    assert 1 <= len(trainer.experts) <= 6
