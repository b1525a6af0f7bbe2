"""SIGTERM (a scheduler's notice before it kills a job) and SIGINT (Ctrl-C) while a command works: training
saves a checkpoint at the next step boundary and exits with 143 / 130 and one line saying how to go on;
``--resume`` then ends exactly as an uninterrupted run. A grid keeps its finished cells, releases the one
in progress, and the rerun completes it."""

from __future__ import annotations

import json
import signal
import time

from faults.conftest import (TIMEOUT, assert_nothing_half_written, count, grid_state, leftovers, train_argv,
                             train_state)
from metatuner.training.checkpoint import latest_checkpoint


def wait_for(condition, child, timeout: float = 60.0) -> None:
    end = time.perf_counter() + timeout
    while not condition():
        assert child.process.exitcode is None, f"the command ended first:\n{child.output()}"
        assert time.perf_counter() < end, child.output()
        time.sleep(0.01)


def logged(run_dir, phase: str):
    def condition() -> bool:
        log = run_dir / "log.jsonl"
        return log.is_file() and any(json.loads(line).get("phase") == phase
                                     for line in log.read_text().splitlines() if line.endswith("}"))
    return condition


def test_sigterm_and_sigint_during_train_save_then_resume_ends_as_an_uninterrupted_run(
        forkserver, tiny_model_dir, tmp_path, reference_train):
    for signum, phase, code in ((signal.SIGTERM, "joint", 143), (signal.SIGINT, "warmup_actor", 130)):
        run_dir = tmp_path / signum.name
        child = forkserver.Child(train_argv(tiny_model_dir, run_dir, False), tmp_path, tmp_path / f"{signum.name}.log")
        wait_for(logged(run_dir, phase), child)
        child.signal_after(signum, 0)
        count("faults injected")
        assert child.wait(TIMEOUT) == code, child.output()
        last = [line for line in child.output().splitlines() if line.startswith("metatuner: ")][-1]
        step = latest_checkpoint(run_dir).name
        assert last.startswith(f"metatuner: stopped by {signum.name} at step {int(step.split('-')[1])}; "
                               f"checkpoint saved in {run_dir / 'checkpoints'}; continue with: metatuner train "
                               f"--resume {run_dir}"), last
        resumed = forkserver.Child(train_argv(tiny_model_dir, run_dir, True), tmp_path, tmp_path / "resume.log")
        assert resumed.wait(TIMEOUT) == 0, resumed.output()
        assert train_state(run_dir) == reference_train[1]
        assert_nothing_half_written(run_dir)
        count("faults survived")


def test_sigterm_during_bench_keeps_finished_cells_and_releases_the_one_in_progress(forkserver, tmp_path,
                                                                                    reference_grid):
    spec, reference, _ = reference_grid
    out = tmp_path / "grid"
    argv = ["bench", "--config", str(spec), "--out", str(out), "--no-report"]
    child = forkserver.Child(argv, tmp_path, tmp_path / "bench.log")
    first = out / "cells" / "arithmetic--sft--seed0"  # the protocol file lists its methods sorted
    wait_for(lambda: (first / "summary.json").is_file(), child)
    child.signal_after(signal.SIGTERM, 0)
    count("faults injected")
    assert child.wait(TIMEOUT) == 143, child.output()
    assert "finished cells are kept" in child.output().splitlines()[-1]
    kept = (first / "records.jsonl").read_bytes()
    assert list((out / "claims").iterdir()) == [] and leftovers(out) == []
    again = forkserver.Child(argv, tmp_path, tmp_path / "again.log")
    assert again.wait(TIMEOUT) == 0, again.output()
    assert "sft seed 0: done, skipped" in again.output()
    assert (first / "records.jsonl").read_bytes() == kept
    assert grid_state(out) == reference
    assert_nothing_half_written(out)
    count("faults survived")


def test_sigterm_to_bench_with_workers_is_forwarded_once_and_each_worker_stops_at_a_safe_point(
        tmp_path, reference_grid, monkeypatch):
    import pytest

    from metatuner import interrupts
    from metatuner.bench.grid import Protocol, run_grid

    spec, reference, _ = reference_grid
    out = tmp_path / "grid"
    cells = out / "cells"
    # the parent's handler is what main() installs; here the request is faked once a cell is done
    monkeypatch.setattr(interrupts, "requested", lambda: signal.SIGTERM if list(cells.glob("*/summary.json")) else None)
    count("faults injected")
    with pytest.raises(interrupts.Stopped, match="and its 2 workers"):
        run_grid(Protocol.load(spec), out, workers=2)
    monkeypatch.undo()
    logs = [(out / "logs" / f"worker-{k}.log").read_text() for k in range(2)]
    assert all(log.count("SIGTERM received") <= 1 for log in logs)  # forwarded once, never twice
    assert list((out / "claims").iterdir()) == [] and leftovers(out) == []  # the cell in progress was released
    run_grid(Protocol.load(spec), out)
    assert grid_state(out) == reference
    assert_nothing_half_written(out)
    count("faults survived")
