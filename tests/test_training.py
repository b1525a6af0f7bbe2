"""MetaTuner training on a tiny random model: gradient routing, schedules, sync, resume, learning."""

import json

import pytest
import torch

from conftest import make_model
from metatuner.config import load_config
from metatuner.errors import MetatunerError
from metatuner.recipes import build_metatuner
from metatuner.tasks import Example, get_task
from metatuner.training.trainer import Trainer

FAST = [
    "train.batch_size=2", "train.rollouts=2", "generator.max_prompt_tokens=4", "train.max_length=128",
    "train.log_every=1", "train.warmup_ratio=0", "train.lr_schedule=constant",
    "train.actor_warmup_steps=0", "train.generator_warmup_queries=0", "train.rollout_every=1",
]


def setup(tok, overrides=(), n_train=8, seed=0, init_range=0.02):
    torch.manual_seed(seed)
    cfg = load_config(None, [*FAST, *overrides])
    mt = build_metatuner(cfg, make_model(tok, seed=seed, init_range=init_range), tok)
    task = get_task("arithmetic")
    return cfg, mt, task, task.load("train")[:n_train]


def snapshot(params):
    return [p.detach().clone() for p in params]


def changed(before, params):
    return any(not torch.equal(a, b) for a, b in zip(before, params))


def randomize_b(mt):
    """Non-zero B everywhere, so every gradient path is open (at init B = 0 blocks some)."""
    with torch.no_grad():
        for name in ("enc", "dec"):
            for key in mt.g_lora.adapters[name]:
                mt.g_lora.wrapped[key].lora_B[name].normal_(0, 0.1)
        for head in mt.hypernet.up_b.values():
            head.weight.normal_(0, 0.01)


def test_task_loss_reaches_hypernet_and_encoder_only(tiny_tokenizer):
    cfg, mt, task, train = setup(tiny_tokenizer)
    randomize_b(mt)
    batch = train[:2]
    mt.answer_nll(task, batch, [task.instruction] * 2, mt.factors(mt.encode(task, batch))).mean().backward()
    groups = mt.parameter_groups()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in groups["hypernet"])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in groups["encoder"])
    assert all(p.grad is None for p in groups["decoder"])


def test_regularization_loss_reaches_decoder_and_encoder_only(tiny_tokenizer):
    cfg, mt, task, train = setup(tiny_tokenizer)
    randomize_b(mt)
    mt.prompt_nll(task, train[:2], ["be brief", "add"]).mean().backward()
    groups = mt.parameter_groups()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in groups["decoder"])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in groups["encoder"])
    assert all(p.grad is None for p in groups["hypernet"])


def test_base_weights_never_change_and_frozen_copy_changes_only_at_sync(tiny_tokenizer, tmp_path):
    cfg, mt, task, train = setup(tiny_tokenizer, ["train.steps=2", "train.sync_every=3", "train.lr_decoder=0.01"])
    base = {n: p.detach().clone() for n, p in mt.actor.named_parameters() if "lora_" not in n}
    frozen = snapshot(mt.g_lora.adapter_parameters("dec_frozen"))
    trainer = Trainer(cfg, mt, task, train, [], tmp_path, progress=False)
    trainer.run()
    assert changed(snapshot(mt.g_lora.adapter_parameters("dec")), frozen)  # the live decoder moved...
    assert not changed(frozen, list(mt.g_lora.adapter_parameters("dec_frozen")))  # ...its frozen copy did not
    cfg.train.steps = 3
    trainer.train_joint()  # step 3 is a sync step
    assert not changed(snapshot(mt.g_lora.adapter_parameters("dec")), list(mt.g_lora.adapter_parameters("dec_frozen")))
    for n, p in mt.actor.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n]), n


@pytest.mark.parametrize("schedule", ["joint", "alternate"])
def test_schedules_step_the_parameters_they_should(tiny_tokenizer, tmp_path, schedule):
    cfg, mt, task, train = setup(tiny_tokenizer, [f"train.schedule={schedule}", "train.steps=1",
                                                  "train.lr_decoder=0.01", "train.lr_hypernet=0.01"])
    groups = mt.parameter_groups()
    trainer = Trainer(cfg, mt, task, train, [], tmp_path, progress=False)
    hyper, dec = snapshot(groups["hypernet"]), snapshot(groups["decoder"])
    trainer.run()  # step 1: J updates both; I updates only the task side (F)
    assert changed(hyper, groups["hypernet"])
    assert changed(dec, groups["decoder"]) == (schedule == "joint")
    if schedule == "alternate":
        hyper, dec = snapshot(groups["hypernet"]), snapshot(groups["decoder"])
        cfg.train.steps = 2
        trainer.train_joint()  # step 2 of I: only the regularizer side (G's decoder)
        assert changed(dec, groups["decoder"]) and not changed(hyper, groups["hypernet"])


def test_resume_continues_exactly(tiny_tokenizer, tmp_path, monkeypatch):
    args = ["train.steps=6", "train.save_every=3", "train.sync_every=2", "train.lr_hypernet=0.01",
            "train.lr_schedule=cosine", "train.warmup_ratio=0.2"]
    cfg, mt, task, train = setup(tiny_tokenizer, args)
    Trainer(cfg, mt, task, train, [], tmp_path / "straight", progress=False).run()
    straight = {k: v.clone() for k, v in mt.trainable_state().items()}

    cfg, mt, task, train = setup(tiny_tokenizer, args)
    trainer = Trainer(cfg, mt, task, train, [], tmp_path / "resumed", progress=False)
    real_save = Trainer.save

    def save_then_crash(self):
        real_save(self)
        if self.step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    monkeypatch.setattr(Trainer, "save", real_save)
    torch.manual_seed(1234)  # the restored RNG state must win over whatever happened since
    cfg, mt, task, train = setup(tiny_tokenizer, args, seed=0)
    Trainer(cfg, mt, task, train, [], tmp_path / "resumed", progress=False).run(resume=True)
    resumed = mt.trainable_state()
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


STOP_ARGS = ["train.steps=8", "train.actor_warmup_steps=3", "train.generator_warmup_queries=4",
             "train.generator_warmup_steps=2", "train.save_every=3", "train.sync_every=2", "train.lr_hypernet=0.01",
             "train.lr_static=0.01", "train.lr_schedule=cosine", "train.warmup_ratio=0.2",
             "train.prompt_branch=always"]  # auto would retire the branch at G's rollouts: G's warm-up would not run


def log_without_timing(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight_run(tiny_tokenizer, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    cfg, mt, task, train = setup(tiny_tokenizer, STOP_ARGS)
    Trainer(cfg, mt, task, train, [], run_dir, progress=False).run()
    return {k: v.clone() for k, v in mt.trainable_state().items()}, log_without_timing(run_dir)


# steps 1-3 warm up M, 4-5 warm up G, 6-8 are joint: inside M's warm-up, inside G's, right after the
# warm-ups, inside joint training
@pytest.mark.parametrize("stop_after", [1, 4, 5, 7])
def test_a_stop_request_saves_at_the_next_step_and_resume_continues_exactly(tiny_tokenizer, tmp_path, monkeypatch,
                                                                            straight_run, stop_after):
    import signal

    from metatuner import interrupts
    from metatuner.training.checkpoint import latest_checkpoint

    cfg, mt, task, train = setup(tiny_tokenizer, STOP_ARGS)
    trainer = Trainer(cfg, mt, task, train, [], tmp_path, progress=False)
    monkeypatch.setattr(interrupts, "requested", lambda: signal.SIGTERM if trainer.step >= stop_after else None)
    with pytest.raises(interrupts.Stopped, match=f"stopped by SIGTERM at step {stop_after}; checkpoint saved") as e:
        trainer.run()
    assert e.value.exit_code == 143 and latest_checkpoint(tmp_path).name == f"step-{stop_after:06d}"
    monkeypatch.undo()
    assert_resume_matches(tiny_tokenizer, tmp_path, STOP_ARGS, straight_run)


# with save_every=2 the warm-ups save after step 2 (inside M's warm-up) and step 4 (inside G's), as joint
# training does, so a run killed without a stop request (no chance to save) loses at most 2 steps
@pytest.mark.parametrize("killed_at", [2, 4])
def test_the_warm_ups_save_every_save_every_steps_and_a_killed_run_resumes_exactly(tiny_tokenizer, tmp_path, monkeypatch,
                                                                                 straight_run, killed_at):
    args = [*STOP_ARGS, "train.save_every=2"]
    cfg, mt, task, train = setup(tiny_tokenizer, args)
    real_save, saved = Trainer.save, []

    def save_then_die(self):
        real_save(self)
        saved.append(self.step)
        if self.step == killed_at:
            raise KeyboardInterrupt  # stands for a kill: nothing after this save runs

    monkeypatch.setattr(Trainer, "save", save_then_die)  # before the trainer hands its save to the loop
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, mt, task, train, [], tmp_path, progress=False).run()
    monkeypatch.undo()
    assert saved == [2, 4][: [2, 4].index(killed_at) + 1]  # each inside a warm-up (steps 1-3 M, 4-5 G)
    assert_resume_matches(tiny_tokenizer, tmp_path, args, straight_run)


def assert_resume_matches(tok, run_dir, overrides, straight) -> None:
    """Resumes the stopped run in ``run_dir`` and checks that its weights and log equal ``straight``'s, the
    ``(trainable state, log)`` of the same run uninterrupted."""
    torch.manual_seed(99)  # the restored RNG state must win
    cfg, mt, task, train = setup(tok, overrides)
    Trainer(cfg, mt, task, train, [], run_dir, progress=False).run(resume=True)
    weights, log = straight
    resumed = mt.trainable_state()
    for k in weights:
        assert torch.equal(weights[k], resumed[k]), k
    assert log_without_timing(run_dir) == log  # the records after the checkpoint were cut, then written again


def test_resume_without_checkpoint_is_an_error(tiny_tokenizer, tmp_path):
    cfg, mt, task, train = setup(tiny_tokenizer)
    with pytest.raises(MetatunerError, match="no checkpoint"):
        Trainer(cfg, mt, task, train, [], tmp_path, progress=False).run(resume=True)


class Toy(type(get_task("arithmetic"))):
    """A learnable toy task: every answer is a short fixed word, so a small LoRA can learn it quickly."""

    name = "toy"

    def load(self, split):
        return [Example(f"toy-{i}", f"say the word {i}", "ok", "The answer is ok") for i in range(4)]


def test_toy_task_loss_falls_and_reward_rises(tiny_tokenizer, tmp_path):
    # a random model with larger weights, so that a small LoRA can move its output within a few steps; at
    # lr 0.01 the loss oscillates (where it lands after 10 steps depended on the CPU's float kernels), at
    # 0.003 it falls every step
    cfg, mt, _, _ = setup(tiny_tokenizer, ["train.steps=10", "train.lr_hypernet=0.003"], init_range=0.3)
    task = Toy()
    Trainer(cfg, mt, task, task.load("train"), [], tmp_path, progress=False).run()
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    joint = [r for r in log if r["phase"] == "joint"]
    first, last = joint[:3], joint[-3:]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "task_loss") < mean(first, "task_loss") - 0.3
    assert mean(last, "reward_initial") > mean(first, "reward_initial") + 0.3


def test_trained_hypernet_gives_different_queries_different_lora(tiny_tokenizer, tmp_path):
    cfg, mt, task, train = setup(tiny_tokenizer, ["train.steps=3", "train.lr_hypernet=0.01"], n_train=4)
    Trainer(cfg, mt, task, train, [], tmp_path, progress=False).run()
    with torch.no_grad():
        factors = mt.factors(mt.encode(task, train[:2]))
    a, b = next(iter(factors.values()))
    assert not torch.allclose(b[0], b[1]) and b.abs().sum() > 0


def test_non_finite_loss_stops_with_a_clear_message(tiny_tokenizer, tmp_path, monkeypatch):
    cfg, mt, task, train = setup(tiny_tokenizer, ["train.steps=4", "train.save_every=1"])
    trainer = Trainer(cfg, mt, task, train, [], tmp_path, progress=False)
    real = type(mt).answer_nll
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        calls["n"] += 1
        out = real(self, *a, **k)
        return out * float("nan") if trainer.step >= 2 else out

    monkeypatch.setattr(type(mt), "answer_nll", poisoned)
    with pytest.raises(MetatunerError, match="non-finite loss at step 3.*last good checkpoint: .*step-000002"):
        trainer.run()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000002"


@pytest.mark.parametrize(
    "override, message",
    [
        ("generator.share_layers=9", "generator.share_layers=9 is beyond G's depth; allowed: 0..4"),
        ("hypernet.rank=0", "hypernet.rank must be >= 1"),
        ("hypernet.targets=[qq_proj]", "target module 'qq_proj' is not in the model; available:"),
        ("train.rollouts=0", "train.rollouts must be >= 1"),
        ("hypernet.layers=[7]", "hypernet.layers has 7; allowed: 0..3"),
    ],
)
def test_impossible_settings_are_rejected_before_any_work(tiny_tokenizer, override, message):
    with pytest.raises(MetatunerError, match=message.replace("(", r"\(").replace("[", r"\[")):
        setup(tiny_tokenizer, [override])


def test_generator_can_be_a_different_checkpoint(tiny_tokenizer, tmp_path):
    from metatuner.models.lora import LoRALinear

    other = tmp_path / "other"
    make_model(tiny_tokenizer, layers=2, seed=5).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    cfg = load_config(None, [*FAST, f"generator.model={other}", "train.steps=1"])
    actor = make_model(tiny_tokenizer)
    base = {n: p.detach().clone() for n, p in actor.named_parameters()}
    mt = build_metatuner(cfg, actor, tiny_tokenizer)
    assert mt.generator is not mt.actor and mt.g_lora.num_layers == 2 and mt.k == round(0.25 * 2)
    task = get_task("arithmetic")
    Trainer(cfg, mt, task, task.load("train")[:4], [], tmp_path / "run", progress=False).run()
    g_adapters = {a for m in mt.generator.modules() if isinstance(m, LoRALinear) for a in m.lora_A}
    m_adapters = {a for m in mt.actor.modules() if isinstance(m, LoRALinear) for a in m.lora_A}
    assert g_adapters == {"enc", "dec", "dec_frozen"} - ({"enc"} if mt.k == 0 else set()) and m_adapters == set()
    for n, p in mt.actor.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n.replace(".base.", ".")]), n


def test_g_and_m_share_one_copy_of_the_base_weights(tiny_tokenizer):
    cfg, mt, task, train = setup(tiny_tokenizer)
    assert mt.generator is mt.actor and mt.g_lora is mt.m_lora
    base_numel = sum(p.numel() for n, p in mt.actor.named_parameters() if "lora_" not in n)
    frozen_in_mt = sum(p.numel() for n, p in mt.named_parameters() if "lora_" not in n and not n.startswith("hypernet."))
    assert frozen_in_mt == base_numel  # the MetaTuner module holds the base weights once
