"""Damaged checkpoints: a flipped byte, a truncated file, a missing file. ``train --resume`` and the
commands that load a run (``eval --run``) name the damage and use the newest intact checkpoint; a resumed
run then ends exactly as an undamaged one. With no intact checkpoint left, one error line."""

from __future__ import annotations

import random
import shutil

import pytest

from faults.conftest import copy_run, half_written, inject, record, results, snapshot, train_state
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
    inject("fault")
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert f"{newest}: {name}" in caplog.text and "; using" in caplog.text and "step-000005" in caplog.text
    assert record("fault", train_state(run_dir) == reference_train[1] and half_written(run_dir) == [])


def test_eval_of_a_run_with_a_damaged_newest_checkpoint_uses_the_one_before(reference_train, tmp_path, caplog):
    """The results equal, bit for bit, those of the same run whose newest checkpoint is step 5."""
    reference_run = copy_run(reference_train, tmp_path / "reference-run")
    shutil.rmtree(reference_run / "checkpoints" / "step-000006")
    (reference_run / "checkpoints" / "latest").write_text("step-000005")
    assert main(["eval", "--run", str(reference_run), "--out", str(tmp_path / "reference")]) == 0
    assert "damaged" not in caplog.text
    run_dir = copy_run(reference_train, tmp_path / "run")
    (run_dir / "checkpoints" / "step-000006" / "trainable.safetensors").write_bytes(b"\0" * 10)
    inject("fault")
    assert main(["eval", "--run", str(run_dir), "--out", str(tmp_path / "e")]) == 0
    assert "using" in caplog.text and "step-000005" in caplog.text
    assert record("fault", results(tmp_path / "e") == results(tmp_path / "reference"))


def test_no_intact_checkpoint_is_one_error_naming_the_damage(reference_train, tmp_path, capsys):
    run_dir = copy_run(reference_train, tmp_path / "run")
    (run_dir / "checkpoints" / "step-000006" / "rng.json").unlink()
    damage(run_dir / "checkpoints" / "step-000005" / "trainable.safetensors", "truncate", random.Random(0))
    before = snapshot(run_dir)
    inject("fault", 2)
    for argv in (["train", "--resume", str(run_dir)], ["eval", "--run", str(run_dir), "--out", str(tmp_path / "e")],
                 ["generate", "--run", str(run_dir), "--question", "What is 2 + 2?"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "no intact checkpoint" in err
        assert "step-000006: rng.json is missing" in err and "step-000005: trainable.safetensors has" in err
    assert record("fault", snapshot(run_dir) == before and not (tmp_path / "e").exists(), 2)  # nothing written
