import errno
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from metatuner import files
from metatuner.errors import MetatunerError
from metatuner.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, verify


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
    assert state == {"format": 2, "step": 3, "extra": {"data_position": 24}}
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
    real_write = files._write_all

    def disk_full_at_second_file(fd, data):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(fd, data)

    monkeypatch.setattr(files, "_write_all", disk_full_at_second_file)
    with pytest.raises(MetatunerError, match="cannot write .*step-000002/scheduler.json: No space left on device"):
        save_checkpoint(tmp_path, 2, trainable(model), opt, sched, {"n": 2})

    assert (tmp_path / "checkpoints" / "latest").read_text() == latest_before
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert latest_checkpoint(tmp_path) == first
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000001"]


def test_crash_before_latest_is_updated(tmp_path, monkeypatch):
    model, opt, sched = build()
    first = save_checkpoint(tmp_path, 1, trainable(model), opt, sched, {})
    real_replace = os.replace

    def crash_on_latest(src, dst):
        if str(dst).endswith("latest"):
            raise OSError("killed")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", crash_on_latest)
    with pytest.raises(MetatunerError, match="killed"):
        save_checkpoint(tmp_path, 2, trainable(model), opt, sched, {})
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == first.name
    assert latest_checkpoint(tmp_path) == first


def test_keeps_only_the_newest(tmp_path):
    model, opt, sched = build()
    for step in range(1, 5):
        train(model, opt, sched, steps=1)
        save_checkpoint(tmp_path, step, trainable(model), opt, sched, {}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert names == ["step-000003", "step-000004"]
    assert latest_checkpoint(tmp_path).name == "step-000004"


class Crash(BaseException):
    """A stand-in for kill -9 at one system call: nothing after it runs, no cleanup either."""


@pytest.mark.parametrize("crash_at", range(1, 13))  # every link, rename and replace of the save
def test_saving_a_step_again_never_leaves_latest_dangling(tmp_path, monkeypatch, crash_at):
    model, opt, sched = build()
    save_checkpoint(tmp_path, 1, trainable(model), opt, sched, {"v": 0})
    train(model, opt, sched, steps=1)
    save_checkpoint(tmp_path, 2, trainable(model), opt, sched, {"v": 1})
    ops = []
    real = {name: getattr(os, name) for name in ("rename", "replace", "link")}

    def crashing(name):
        def op(*args, **kwargs):
            ops.append(name)
            if len(ops) == crash_at:
                raise Crash
            return real[name](*args, **kwargs)
        return op

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name in real:
        monkeypatch.setattr(os, name, crashing(name))
    monkeypatch.setattr(os, "getpid", lambda: dead.pid)  # its leftovers are a dead process's
    monkeypatch.setattr(files, "_remove", lambda path: None)  # a killed process cleans nothing up
    try:
        save_checkpoint(tmp_path, 2, trainable(model), opt, sched, {"v": 2})  # the same step again
    except Crash:
        pass
    monkeypatch.undo()
    assert len(ops) >= crash_at
    root = tmp_path / "checkpoints"
    named = root / (root / "latest").read_text().strip()
    assert named.is_dir() and verify(named) == [], f"latest names {named.name} after a crash at operation {crash_at}"
    _, state = load_checkpoint(latest_checkpoint(tmp_path), opt, sched)
    assert state["step"] == 2 and state["extra"]["v"] in (1, 2)
    save_checkpoint(tmp_path, 3, trainable(model), opt, sched, {"v": 3})  # the next save cleans up
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000002", "step-000003"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "delete-manifest"])
def test_a_damaged_checkpoint_is_named_and_the_previous_one_used(tmp_path, caplog, damage):
    model, opt, sched = build()
    first = save_checkpoint(tmp_path, 1, trainable(model), opt, sched, {"v": 1})
    train(model, opt, sched, steps=1)
    second = save_checkpoint(tmp_path, 2, trainable(model), opt, sched, {"v": 2})
    victim = second / ("manifest.json" if damage == "delete-manifest" else "optimizer.safetensors")
    data = victim.read_bytes()
    if damage == "flip":
        victim.write_bytes(data[:100] + bytes([data[100] ^ 0x01]) + data[101:])
    elif damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    else:
        victim.unlink()
    with caplog.at_level("WARNING"):
        assert latest_checkpoint(tmp_path) == first
    assert "step-000002" in caplog.text and victim.name in caplog.text and "using" in caplog.text
    with pytest.raises(MetatunerError, match=f"cannot load checkpoint .*step-000002: {victim.name}"):
        load_checkpoint(second, opt, sched)
    (first / "trainable.safetensors").write_bytes(b"")
    with pytest.raises(MetatunerError, match="no intact checkpoint in .*step-000001: trainable.safetensors has 0 bytes"):
        latest_checkpoint(tmp_path)


def test_fewer_than_two_kept_checkpoints_is_refused(tmp_path):
    model, opt, sched = build()
    with pytest.raises(MetatunerError, match="keep must be >= 2"):
        save_checkpoint(tmp_path, 1, trainable(model), opt, sched, {}, keep=1)


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


def test_a_checkpoint_from_before_manifests_still_loads(tmp_path):
    import json

    model, opt, sched = build()
    path = save_checkpoint(tmp_path, 1, trainable(model), opt, sched, {"v": 1})
    (path / "manifest.json").unlink()
    state = json.loads((path / "state.json").read_text())
    del state["format"]
    (path / "state.json").write_text(json.dumps(state))
    assert verify(path) == [] and latest_checkpoint(tmp_path) == path
    assert load_checkpoint(path, opt, sched)[1] == {"step": 1, "extra": {"v": 1}}
