"""Damaged checkpoints: a flipped byte, a truncated file, a missing file. ``train --resume`` and the
commands that load a run (``eval --run``) name the damage and use the newest intact checkpoint; a resumed
run then ends exactly as an undamaged one. With no intact checkpoint left, one error line."""

from __future__ import annotations

import random

import pytest

from faults.conftest import assert_nothing_half_written, copy_run, count, snapshot, train_state
from metatuner.cli import main

FILES = ["trainable.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json", "rng.safetensors",
         "rng.json", "state.json", "manifest.json"]
CASES = random.Random(2509).sample([(f, d) for f in FILES for d in ("flip", "truncate", "delete")], 6)


def damage(path, how: str, rng: random.Random) -> None:
    data = path.read_bytes()
    if how == "flip":
        i = rng.randrange(len(data))
        path.write_bytes(data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:])
    elif how == "truncate":
        path.write_bytes(data[: rng.randrange(len(data))])
    else:
        path.unlink()


@pytest.mark.parametrize("name, how", CASES)
def test_resume_skips_a_damaged_checkpoint_and_ends_as_an_undamaged_run(reference_train, tmp_path, caplog, name, how):
    run_dir = copy_run(reference_train, tmp_path / "run")
    newest = run_dir / "checkpoints" / "step-000006"
    damage(newest / name, how, random.Random(name + how))
    count("faults injected")
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert f"{newest}: {name}" in caplog.text and "; using" in caplog.text and "step-000005" in caplog.text
    assert train_state(run_dir) == reference_train[1]
    assert_nothing_half_written(run_dir)
    count("faults survived")


def test_eval_of_a_run_with_a_damaged_newest_checkpoint_uses_the_one_before(reference_train, tmp_path, caplog):
    run_dir = copy_run(reference_train, tmp_path / "run")
    (run_dir / "checkpoints" / "step-000006" / "trainable.safetensors").write_bytes(b"\0" * 10)
    count("faults injected")
    assert main(["eval", "--run", str(run_dir), "--out", str(tmp_path / "e")]) == 0
    assert "using" in caplog.text and "step-000005" in caplog.text and (tmp_path / "e" / "summary.json").is_file()
    count("faults survived")


def test_no_intact_checkpoint_is_one_error_naming_the_damage(reference_train, tmp_path, capsys):
    run_dir = copy_run(reference_train, tmp_path / "run")
    (run_dir / "checkpoints" / "step-000006" / "rng.json").unlink()
    damage(run_dir / "checkpoints" / "step-000005" / "trainable.safetensors", "truncate", random.Random(0))
    before = snapshot(run_dir)
    count("faults injected", 2)
    for argv in (["train", "--resume", str(run_dir)], ["eval", "--run", str(run_dir), "--out", str(tmp_path / "e")],
                 ["generate", "--run", str(run_dir), "--question", "What is 2 + 2?"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "no intact checkpoint" in err
        assert "step-000006: rng.json is missing" in err and "step-000005: trainable.safetensors has" in err
    assert snapshot(run_dir) == before and not (tmp_path / "e").exists()
    count("faults survived", 2)
