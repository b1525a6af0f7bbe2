"""The grid on Ray (``bench --backend ray``): the same results as local workers, and a Ray worker killed in
mid-cell costs nothing.

One local Ray cluster (2 CPUs) serves the module: starting it and its worker processes (each imports torch)
takes tens of seconds, so the tests are marked ``ray`` (``-m "not ray"`` leaves them out of a quick run). The
grid is the fault suite's two cells (zero-shot, and SFT with a checkpoint every step) plus a tuning job for
SFT, so cells and tuning jobs both run as Ray tasks.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import pytest
import yaml

from faults.conftest import grid_state, half_written, inject, leftovers, protocol, record

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray  # a cluster and its workers start in tens of seconds

TUNE = {"overrides": {"train.steps": 1}, "methods": {"sft": {"train.lr_scale": [1.0, 2.0]}}}
TIMING = {"fit_seconds", "seconds"}  # a tuning record's wall-clock fields


@pytest.fixture(scope="module")
def spec(tiny_model_dir, tmp_path_factory):
    path = protocol(tmp_path_factory.mktemp("ray-protocol"), tiny_model_dir)
    data = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump(data | {"tune": TUNE}))
    return path


@pytest.fixture(scope="module")
def booted(spec, tmp_path_factory):
    """The local cluster, started while ``--workers 2`` runs the reference grid (its worker processes wait on
    nothing Ray does): the reference's folder and state."""
    from metatuner.bench.grid import run_grid
    from metatuner.bench.protocol import Protocol

    out = tmp_path_factory.mktemp("ray-reference") / "grid"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # one thread per cell, as each Ray task below has
        failed = []
        grid = threading.Thread(target=lambda: _catch(failed, run_grid, Protocol.load(spec), out, workers=2))
        grid.start()
        # one GPU declared (there is none): what a GPU cell gets from Ray is observable on a CPU
        ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
        grid.join()
    if failed:
        ray.shutdown()
        raise failed[0]
    yield out, state(out)
    ray.shutdown()


def _catch(failed: list, fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001 - reported by the fixture, in the test's thread
        failed.append(e)


@pytest.fixture(scope="module")
def cluster(booted):
    return None


@pytest.fixture(scope="module")
def reference(booted):
    """The grid run by ``--workers 2``: its folder and state (the reference every test compares with)."""
    return booted


def state(out) -> dict:
    """A finished grid's rows, records and training logs (timing left out), and its tuning choices."""
    choices = {p.name: json.loads(p.read_text()) for p in sorted((out / "tuning").glob("*.json"))}
    for choice in choices.values():
        choice["seconds"] = None
        choice["tried"] = [{k: v for k, v in t.items() if k not in TIMING} for t in choice["tried"]]
    return grid_state(out) | {"tuning": choices}


def started(out, name: str) -> int:
    """How many times a Ray task began running cell ``name`` (its log's start lines)."""
    log = out / "logs" / f"{name}.log"
    return sum(line.endswith(" ...") for line in log.read_text().splitlines()) if log.is_file() else 0


def test_a_ray_grid_gives_the_results_of_local_workers_and_resumes_theirs(cluster, spec, reference, tmp_path):
    from metatuner.bench.cells import cell_dir
    from metatuner.bench.grid import run_grid
    from metatuner.bench.protocol import Protocol
    from metatuner.bench.report import report, table

    ref_out, ref_state = reference
    out = tmp_path / "grid"
    rows = run_grid(Protocol.load(spec), out, backend="ray")
    assert state(out) == ref_state
    assert table(rows) == table(json.loads((ref_out / "results.json").read_text()))  # results.md's table
    assert report(out)[0].read_text().split("| method | optimizer steps")[0] == \
        report(ref_out)[0].read_text().split("| method | optimizer steps")[0]
    assert [started(out, cell_dir(out, "arithmetic", m, 0).name) for m in ("zero-shot", "sft")] == [1, 1]
    assert "tuning sft on arithmetic: train.lr_scale=" in (out / "logs" / "tuning--arithmetic--sft.log").read_text()
    assert not list((out / "claims").iterdir()) and leftovers(out) == []

    # either backend resumes the other's grid: Ray finishes what local workers left, and the reverse
    resumed = tmp_path / "resumed"
    import shutil

    shutil.copytree(ref_out, resumed)
    shutil.rmtree(cell_dir(resumed, "arithmetic", "sft", 0))
    run_grid(Protocol.load(spec), resumed, backend="ray")
    assert state(resumed) == ref_state and started(resumed, "arithmetic--zero-shot--seed0") == 0
    shutil.rmtree(cell_dir(out, "arithmetic", "zero-shot", 0))
    run_grid(Protocol.load(spec), out)
    assert state(out) == ref_state


def test_a_ray_worker_killed_in_mid_cell_is_rerun_and_no_cell_runs_twice(cluster, spec, reference, tmp_path):
    from metatuner.bench.grid import run_grid
    from metatuner.bench.protocol import Protocol

    out = tmp_path / "grid"
    sft = "arithmetic--sft--seed0"
    claim, train_log = out / "claims" / f"{sft}.claim", out / "cells" / f"{sft}-train" / "log.jsonl"
    killed = []

    def kill_once_training():  # SIGKILL the Ray worker holding the SFT cell once it has trained a step
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            try:
                owner = re.match(r"pid (\d+) ", claim.read_text())
            except FileNotFoundError:
                owner = None
            if owner and train_log.is_file() and train_log.stat().st_size > 0:
                pid = int(owner.group(1))
                assert pid != os.getpid()
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.005)

    killer = threading.Thread(target=kill_once_training, daemon=True)
    killer.start()
    inject("fault")
    run_grid(Protocol.load(spec), out, backend="ray")
    killer.join()
    assert len(killed) == 1
    # the killed cell ran again (its claim taken over from the dead worker), the other cell and the tuning once
    assert started(out, sft) == 2 and started(out, "arithmetic--zero-shot--seed0") == 1
    assert (out / "logs" / "tuning--arithmetic--sft.log").read_text().count("train.lr_scale=1.0 ->") == 1
    assert record("fault", state(out) == reference[1] and half_written(out, stale_ok=False) == []
                  and not list((out / "claims").iterdir()))


def test_sigterm_to_a_ray_grid_ends_its_tasks_and_a_rerun_finishes_the_grid(cluster, spec, reference, tmp_path,
                                                                           monkeypatch):
    from metatuner import interrupts
    from metatuner.bench.grid import run_grid
    from metatuner.bench.protocol import Protocol

    out = tmp_path / "grid"
    tuning_log = out / "logs" / "tuning--arithmetic--sft.log"
    # the request that main()'s handler records, faked once the tuning task has started: the SFT cell, which
    # starts only when the tuning task returns, cannot have finished (faked once the tuning's choice was on
    # file, the SFT cell sometimes finished before the driver's next poll under load)
    monkeypatch.setattr(interrupts, "requested", lambda: signal.SIGTERM if tuning_log.is_file() else None)
    inject("fault")
    with pytest.raises(interrupts.Stopped, match="and its Ray tasks"):
        run_grid(Protocol.load(spec), out, backend="ray")
    monkeypatch.undo()
    assert not (out / "cells" / "arithmetic--sft--seed0" / "summary.json").exists()
    run_grid(Protocol.load(spec), out, backend="ray", gpus_per_cell=0.5)  # the rest as GPU cells
    # the stopped tuning ran again to its end (its choice is in the state compared with the reference)
    tuned = (out / "logs" / "tuning--arithmetic--sft.log").read_text().count("train.lr_scale=1.0 ->")
    assert record("fault", tuned >= 1 and state(out) == reference[1] and half_written(out) == []
                  and not list((out / "claims").iterdir()))
    # a GPU cell saw only its GPU, and its worker process exited after it (torch's cached GPU memory with it)
    where = re.findall(r"\[ray\] arithmetic--sft--seed0: pid (\d+) on .*, GPUs (\S+)",
                       (out / "logs" / "arithmetic--sft--seed0.log").read_text())[-1]
    assert where[1] == "0"
    deadline = time.time() + 30
    while alive(int(where[0])) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(int(where[0]))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
