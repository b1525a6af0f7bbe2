"""SIGTERM (a scheduler's notice before it kills a job) and SIGINT (Ctrl-C) while a command works: training
saves a checkpoint at the next step boundary and exits with 143 / 130 and one line saying how to go on;
``--resume`` then ends exactly as an uninterrupted run. A grid keeps its finished cells, releases the one
in progress, and the rerun completes it."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from faults.conftest import TIMEOUT, grid_state, half_written, inject, leftovers, record, train_argv, train_state
from metatuner.training.checkpoint import latest_checkpoint


def _signalled_child(argv: list[str], cwd: str, log: str, signum: int, where: tuple[str, str]) -> None:
    """In the forked child: runs the command, raising ``signum`` in itself exactly once at ``where``:
    ``("phase", name)`` right after the first record of that training phase is logged, ``("cell", name)`` as
    the grid starts evaluating that cell (its claim held). A signal sent from outside once a file shows that
    point would land later by however long this loaded machine took to notice, possibly after the command
    had finished."""
    from faults import runner
    from metatuner import recipes
    from metatuner.training import logbook

    kind, name = where
    fired = []

    def fire() -> None:
        if not fired:
            fired.append(True)
            signal.raise_signal(signum)  # delivered to this thread: its handler has run when the call returns

    if kind == "phase":
        write = logbook.Logbook.write

        def logged(self, record):
            write(self, record)
            if record.get("phase") == name:
                fire()

        logbook.Logbook.write = logged
    else:
        eval_method = recipes.eval_method

        def evaluated(cfg, out_dir, **kw):
            if out_dir is not None and Path(out_dir).name == name:
                fire()
            return eval_method(cfg, out_dir, **kw)

        recipes.eval_method = evaluated
    runner._child(argv, cwd, log, None)


def signalled(forkserver, argv: list[str], cwd: Path, log: Path, signum: int, where: tuple[str, str]):
    """``forkserver.Child(argv, cwd, log)`` that raises ``signum`` in itself at ``where`` (:func:`_signalled_child`)."""
    child = forkserver.Child.__new__(forkserver.Child)
    child.log = Path(log)
    child.process = forkserver.context().Process(target=_signalled_child,
                                                 args=(list(argv), str(cwd), str(log), signum, where))
    child.started = time.perf_counter()
    child.process.start()
    return child


def test_sigterm_and_sigint_during_train_save_then_resume_ends_as_an_uninterrupted_run(
        forkserver, tiny_model_dir, tmp_path, reference_train):
    for signum, phase, code in ((signal.SIGTERM, "joint", 143), (signal.SIGINT, "warmup_actor", 130)):
        run_dir = tmp_path / signum.name
        child = signalled(forkserver, train_argv(tiny_model_dir, run_dir, False), tmp_path,
                          tmp_path / f"{signum.name}.log", signum, ("phase", phase))
        inject("fault")
        assert child.wait(TIMEOUT) == code, child.output()
        last = [line for line in child.output().splitlines() if line.startswith("metatuner: ")][-1]
        step = latest_checkpoint(run_dir).name
        assert last.startswith(f"metatuner: stopped by {signum.name} at step {int(step.split('-')[1])}; "
                               f"checkpoint saved in {run_dir / 'checkpoints'}; continue with: metatuner train "
                               f"--resume {run_dir}"), last
        resumed = forkserver.Child(train_argv(tiny_model_dir, run_dir, True), tmp_path, tmp_path / "resume.log")
        assert resumed.wait(TIMEOUT) == 0, resumed.output()
        assert record("fault", train_state(run_dir) == reference_train[1] and half_written(run_dir) == [])


def test_sigterm_during_bench_keeps_finished_cells_and_releases_the_one_in_progress(forkserver, tmp_path,
                                                                                    reference_grid):
    spec, reference, _ = reference_grid
    out = tmp_path / "grid"
    argv = ["bench", "--config", str(spec), "--out", str(out), "--no-report"]
    first = out / "cells" / "arithmetic--sft--seed0"  # the protocol file lists its methods sorted
    # SIGTERM once the first cell is finished and the second one is in progress
    child = signalled(forkserver, argv, tmp_path, tmp_path / "bench.log", signal.SIGTERM,
                      ("cell", "arithmetic--zero-shot--seed0"))
    inject("fault")
    assert child.wait(TIMEOUT) == 143, child.output()
    assert "in cell arithmetic--zero-shot--seed0" in child.output().splitlines()[-1]
    assert "finished cells are kept" in child.output().splitlines()[-1]
    kept = (first / "records.jsonl").read_bytes()
    assert list((out / "claims").iterdir()) == [] and leftovers(out) == []
    again = forkserver.Child(argv, tmp_path, tmp_path / "again.log")
    assert again.wait(TIMEOUT) == 0, again.output()
    assert "sft seed 0: done, skipped" in again.output()
    assert record("fault", (first / "records.jsonl").read_bytes() == kept and grid_state(out) == reference
                  and half_written(out) == [])


def test_sigterm_to_bench_with_workers_is_forwarded_once_and_each_worker_stops_at_a_safe_point(
        tmp_path, reference_grid, monkeypatch):
    import pytest

    from metatuner import interrupts
    from metatuner.bench.grid import run_grid
    from metatuner.bench.protocol import Protocol

    spec, reference, _ = reference_grid
    out = tmp_path / "grid"
    cells = out / "cells"
    # the parent's handler is what main() installs; here the request is faked once a cell is done
    monkeypatch.setattr(interrupts, "requested", lambda: signal.SIGTERM if list(cells.glob("*/summary.json")) else None)
    inject("fault")
    with pytest.raises(interrupts.Stopped, match="and its 2 workers"):
        run_grid(Protocol.load(spec), out, workers=2)
    monkeypatch.undo()
    logs = [(out / "logs" / f"worker-{k}.log").read_text() for k in range(2)]
    assert all(log.count("SIGTERM received") <= 1 for log in logs)  # forwarded once, never twice
    assert list((out / "claims").iterdir()) == [] and leftovers(out) == []  # the cell in progress was released
    run_grid(Protocol.load(spec), out)
    assert record("fault", grid_state(out) == reference and half_written(out) == [])
