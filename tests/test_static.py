"""The SFT baseline's model and loop: a static LoRA on M alone (:mod:`metatuner.models.static`), trained by the
one supervised loop (:mod:`metatuner.training.supervised`, :func:`metatuner.training.sft.fine_tune`).

It holds exactly the tensors MetaTuner's static LoRA holds (names and, for the same seed, initial values),
loads the checkpoints SFT wrote when it was built as a MetaTuner with G and F unused, and a stop inside
SFT saves a checkpoint of the static LoRA alone."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from conftest import make_model
from metatuner import interrupts
from metatuner.config import load_config
from metatuner.models.metatuner import MetaTuner, draw_like_construction
from metatuner.models.static import StaticLoRA
from metatuner.tasks import get_task
from metatuner.training.checkpoint import latest_checkpoint, read_trainable, save_checkpoint
from metatuner.training.sft import fine_tune
from metatuner.training.supervised import SupervisedLoop

TASK = get_task("arithmetic")
CFG = ["train.batch_size=2", "train.static_rank=4", "train.lr_static=0.05", "data.val_size=0"]


def test_draw_like_construction_draws_what_building_a_metatuner_draws(tiny_tokenizer):
    cfg = load_config(None, CFG)
    model = make_model(tiny_tokenizer)
    torch.manual_seed(3)
    MetaTuner(model, tiny_tokenizer, cfg.generator, cfg.hypernet)
    after_build = torch.rand(4)
    model = make_model(tiny_tokenizer)
    torch.manual_seed(3)
    draw_like_construction(model, cfg.generator, cfg.hypernet)
    assert torch.equal(torch.rand(4), after_build)
    assert not any(type(m).__name__ == "LoRALinear" for m in model.modules())  # nothing was wrapped


def test_static_lora_holds_metatuners_static_tensors_from_the_same_seed(tiny_tokenizer):
    cfg = load_config(None, CFG)
    model = make_model(tiny_tokenizer)
    torch.manual_seed(0)
    mt = MetaTuner(model, tiny_tokenizer, cfg.generator, cfg.hypernet)
    mt.add_static_adapter(cfg.train.static_rank, cfg.train.static_alpha)
    theirs = {k: v for k, v in mt.trainable_state().items() if k.startswith("static.")}
    model = make_model(tiny_tokenizer)
    torch.manual_seed(0)
    draw_like_construction(model, cfg.generator, cfg.hypernet)
    static = StaticLoRA.from_config(model, tiny_tokenizer, cfg)
    assert static.parameters() == [] and static.state() == {}  # no adapter before reset
    static.reset()
    ours = static.state()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert static.parameter_groups() == {"static": static.parameters()}


def test_a_checkpoint_sft_wrote_as_a_metatuner_loads_into_a_static_lora(tiny_tokenizer, tmp_path):
    """SFT runs were a MetaTuner with G and F unused: their checkpoints hold G's adapters and F too."""
    cfg = load_config(None, CFG)
    mt = MetaTuner(make_model(tiny_tokenizer), tiny_tokenizer, cfg.generator, cfg.hypernet, use_hypernet=False,
                   use_prompt=False)
    mt.add_static_adapter(cfg.train.static_rank, cfg.train.static_alpha)
    with torch.no_grad():
        for p in mt.m_lora.adapter_parameters("static"):
            p.normal_(0, 0.1)  # a trained static LoRA
    params = list(mt.m_lora.adapter_parameters("static"))
    opt = torch.optim.AdamW(params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    save_checkpoint(tmp_path, 3, mt.trainable_state(), opt, sched, {"has_static": True, "cursor": 0})
    tensors, state = read_trainable(latest_checkpoint(tmp_path))
    assert any(k.startswith("hypernet.") for k in tensors) and state["extra"]["has_static"]

    static = StaticLoRA.from_config(make_model(tiny_tokenizer), tiny_tokenizer, cfg)
    static.load_state(tensors)
    batch = TASK.load("test")[:3]
    prompts = [TASK.instruction] * 3
    with torch.no_grad():
        assert torch.equal(static.answer_nll(TASK, batch, prompts), mt.answer_nll(TASK, batch, prompts, None))
    with pytest.raises(Exception, match="lacks"):
        static.load_state({})


def test_a_stop_inside_sft_saves_the_static_lora_and_the_data_position(tiny_tokenizer, tmp_path, monkeypatch):
    cfg = load_config(None, [*CFG, "train.steps=4"])
    static = StaticLoRA.from_config(make_model(tiny_tokenizer), tiny_tokenizer, cfg)
    steps = []

    def on_step(step):
        steps.append(step)
        if step == 2:  # a SIGTERM arrives during step 2: the safe point after it saves and stops
            monkeypatch.setattr(interrupts, "requested", lambda: signal.SIGTERM)

    with pytest.raises(interrupts.Stopped, match="at step 2; checkpoint saved in"):
        fine_tune(static, cfg, TASK, TASK.load("train")[:8], 4, tmp_path, on_step=on_step, progress=False)
    assert steps == [0, 1, 2]
    tensors, state = read_trainable(latest_checkpoint(tmp_path))
    assert tensors.keys() == static.state().keys()
    assert all(torch.equal(tensors[k], v) for k, v in static.state().items())
    assert state["step"] == 2 and state["extra"]["cursor"] == 4 and state["extra"]["has_static"]
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["phase"] == "warmup_actor" and "sft_loss" in r for r in log)
    # only MetaTuner runs load and resume: a stopped SFT fit's folder is refused with the reason
    from metatuner.config import save_config
    from metatuner.errors import MetatunerError
    from metatuner.recipes import load_run

    save_config(load_config(None, ["method=sft"]), tmp_path / "config.yaml")
    with pytest.raises(MetatunerError, match="not a MetaTuner checkpoint .* a stopped sft fit"):
        load_run(tmp_path)


def test_the_loop_resumes_bit_for_bit(tiny_tokenizer, tmp_path):
    """Four steps in one go, and two steps, a checkpoint, and two more in a fresh loop: the same tensors."""
    from metatuner.training.stream import DataStream

    cfg = load_config(None, CFG)
    train = TASK.load("train")[:8]

    def run(stop_at=None, resume=False, run_dir=None):
        torch.manual_seed(0)
        static = StaticLoRA.from_config(make_model(tiny_tokenizer), tiny_tokenizer, cfg)
        static.reset()
        loop = SupervisedLoop(cfg.train, run_dir, progress=False)
        loop.setup(4, static.parameter_groups())
        stream = DataStream(train, 1)
        if resume:
            tensors, extra = loop.restore(latest_checkpoint(run_dir))
            static.load_state(tensors)
            stream.cursor = extra["cursor"]
        loss = lambda batch: static.answer_nll(TASK, batch, [TASK.instruction] * len(batch)).mean()  # noqa: E731
        loop.run("sft", "sft", stop_at or 4, stream, loss, start=loop.step)
        if stop_at:
            loop.save_checkpoint(static.state(), {"cursor": stream.cursor})
        return static.state()

    whole = run()
    run(stop_at=2, run_dir=tmp_path)
    resumed = run(resume=True, run_dir=tmp_path)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_sft_saves_every_save_every_steps_and_resumes_bit_for_bit(tiny_tokenizer, tmp_path, monkeypatch):
    cfg = load_config(None, [*CFG, "train.steps=5"])
    train = TASK.load("train")[:8]

    def fit(run_dir, **kw):
        torch.manual_seed(0)
        static = StaticLoRA.from_config(make_model(tiny_tokenizer), tiny_tokenizer, cfg)
        steps = []
        fine_tune(static, cfg, TASK, train, 5, run_dir, on_step=steps.append, progress=False, **kw)
        return static, steps

    straight, _ = fit(tmp_path / "straight")
    from metatuner.training.supervised import SupervisedLoop

    real_save = SupervisedLoop.periodic_save

    def save_then_die(self):
        saved = real_save(self)
        if saved and self.step == 4:
            raise KeyboardInterrupt  # a kill right after the save at step 4: no stop request, no other save
        return saved

    with monkeypatch.context() as m:
        m.setattr(SupervisedLoop, "periodic_save", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            fit(tmp_path / "killed", save_every=2)
    assert [p.name for p in sorted((tmp_path / "killed" / "checkpoints").glob("step-*"))] == ["step-000002", "step-000004"]
    torch.manual_seed(99)  # the restored RNG state must win
    resumed, steps = fit(tmp_path / "killed", save_every=2, resume=True)
    assert steps == [5]  # steps 1-4 were not taken again
    assert all(torch.equal(v, resumed.state()[k]) for k, v in straight.state().items())
    log = [json.loads(line) for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    from metatuner.errors import MetatunerError

    with pytest.raises(MetatunerError, match="resume: no checkpoint"):
        fit(tmp_path / "empty", resume=True)
