import math
import random

import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file

from metatuner.errors import MetatunerError
from metatuner.training import checkpoint
from metatuner.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = torch.nn.Linear(4, 4).requires_grad_(False)
        self.head = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.frozen(x)))


def build(seed=0):
    torch.manual_seed(seed)
    model = Toy()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)

    def warmup_cosine(i, warmup=2, total=6):
        return (i + 1) / warmup if i < warmup else 0.5 * (1 + math.cos(math.pi * (i - warmup) / (total - warmup)))

    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine)


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def train(model, opt, sched, steps):
    for _ in range(steps):
        # data drawn from all three RNGs so that each one's state matters
        x = torch.randn(8, 4) * (1 + random.random()) + float(np.random.rand())
        loss = (model(x) - x.flip(1)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def draws():
    return torch.rand(3), random.random(), np.random.rand(3)


def seed_all(seed):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def assert_same_optimizer_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for idx in sa["state"]:
        assert sa["state"][idx].keys() == sb["state"][idx].keys()
        for name, value in sa["state"][idx].items():
            other = sb["state"][idx][name]
            assert value.dtype == other.dtype and value.device == other.device
            assert torch.equal(value, other), (idx, name)


def test_resume_is_exact(tmp_path):
    seed_all(1)
    straight = build()
    train(*straight, steps=6)
    straight_draws = draws()

    seed_all(1)
    first = build()
    train(*first, steps=3)
    path = save_checkpoint(tmp_path, 3, trainable(first[0]), first[1], first[2], {"data_position": 24})

    model, opt, sched = build(seed=5)  # fresh objects with different weights
    seed_all(99)
    tensors, state = load_checkpoint(latest_checkpoint(tmp_path), opt, sched)
    assert latest_checkpoint(tmp_path) == path
    assert state == {"step": 3, "extra": {"data_position": 24}}
    model.load_state_dict(tensors, strict=False)
    model.frozen.load_state_dict(first[0].frozen.state_dict())  # frozen weights come from the base model
    train(model, opt, sched, steps=3)

    for (name, a), b in zip(straight[0].state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    assert_same_optimizer_state(straight[1], opt)
    assert isinstance(opt.state_dict()["state"][0]["step"], torch.Tensor)
    assert opt.param_groups[0]["lr"] == straight[1].param_groups[0]["lr"]
    assert sched.state_dict() == straight[2].state_dict()
    t, p, n = draws()
    assert torch.equal(t, straight_draws[0]) and p == straight_draws[1] and np.array_equal(n, straight_draws[2])


def test_only_given_tensors_are_saved(tmp_path):
    model, opt, sched = build()
    train(model, opt, sched, steps=1)
    path = save_checkpoint(tmp_path, 1, trainable(model), opt, sched, {})
    saved = load_file(path / "trainable.safetensors")
    assert saved.keys() == {"head.weight", "head.bias"}
    assert torch.equal(saved["head.weight"], model.head.weight)
    assert set(load_file(path / "optimizer.safetensors")) == {
        f"state.{i}.{n}" for i in (0, 1) for n in ("step", "exp_avg", "exp_avg_sq")
    }


def test_crash_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, opt, sched = build()
    train(model, opt, sched, steps=1)
    first = save_checkpoint(tmp_path, 1, trainable(model), opt, sched, {"n": 1})
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    latest_before = (tmp_path / "checkpoints" / "latest").read_text()

    train(model, opt, sched, steps=1)
    calls = []

    def crashing_save_file(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        return safetensors.torch.save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", crashing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, trainable(model), opt, sched, {"n": 2})

    assert (tmp_path / "checkpoints" / "latest").read_text() == latest_before
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert latest_checkpoint(tmp_path) == first
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000001"]


def test_crash_before_latest_is_updated(tmp_path, monkeypatch):
    model, opt, sched = build()
    first = save_checkpoint(tmp_path, 1, trainable(model), opt, sched, {})
    real_replace = checkpoint.os.replace

    def crash_on_latest(src, dst):
        if str(dst).endswith("latest"):
            raise OSError("killed")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", crash_on_latest)
    with pytest.raises(OSError, match="killed"):
        save_checkpoint(tmp_path, 2, trainable(model), opt, sched, {})
    assert latest_checkpoint(tmp_path) == first


def test_keeps_only_the_newest(tmp_path):
    model, opt, sched = build()
    for step in range(1, 5):
        train(model, opt, sched, steps=1)
        save_checkpoint(tmp_path, step, trainable(model), opt, sched, {}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert names == ["step-000003", "step-000004"]
    assert latest_checkpoint(tmp_path).name == "step-000004"


def test_no_checkpoint_yet(tmp_path):
    assert latest_checkpoint(tmp_path) is None


def test_missing_or_corrupt_checkpoint_is_a_user_error(tmp_path):
    model, opt, sched = build()
    with pytest.raises(MetatunerError, match="cannot load checkpoint .*step-000007"):
        load_checkpoint(tmp_path / "step-000007", opt, sched)
    path = save_checkpoint(tmp_path, 1, trainable(model), opt, sched, {})
    (path / "optimizer.safetensors").write_bytes(b"garbage")
    with pytest.raises(MetatunerError, match=f"cannot load checkpoint {path}"):
        load_checkpoint(path, opt, sched)


def test_non_json_extra_fails_before_writing(tmp_path):
    model, opt, sched = build()
    with pytest.raises(MetatunerError, match="extra state is not JSON-serialisable"):
        save_checkpoint(tmp_path, 1, trainable(model), opt, sched, {"bad": object()})
    assert not (tmp_path / "checkpoints").exists()
