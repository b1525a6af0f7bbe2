"""The grid on a Ray cluster: every tuning job and every cell is a Ray task running the local workers' code.

A cell's task runs :func:`metatuner.bench.workers.run_cell`, the job a local grid process runs, under the same
claim in the grid folder; a tuning job's task runs :func:`metatuner.bench.tuning.tune_job`. The folder must be
on a filesystem every node shares (with ``flock``, as NFSv4 and Lustre mounted with ``flock`` have), so the
layout, the claims and the results are those of a local grid: a grid started on Ray can be resumed with local
workers and the other way round, and a Ray grid and local workers may share one folder. Each task reserves
``cpus_per_cell`` CPUs (torch's threads) and ``gpus_per_cell`` GPUs (Ray sets ``CUDA_VISIBLE_DEVICES``).

A cell that needs a tuning choice gets its tuning task's result as an argument, so Ray starts it once the
choice is on file; the other cells start at once. A task whose worker process dies (killed, out of memory,
its node lost) is rerun by Ray up to :data:`MAX_RETRIES` times: the rerun takes over the dead process's claim,
clears what it left half-written, and runs the cell again; a cell that finished is never run again, since
its folder is complete. A task's output goes to ``logs/<cell or job>.log`` in the grid folder. A SIGTERM or
SIGINT ends the tasks at once (their worker processes exit, as after kill -9) and stops; finished cells are
kept, and rerunning the same command runs the ones that were in progress again.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator

from metatuner import files, interrupts
from metatuner.bench import tuning
from metatuner.bench.cells import cell_dir, file_name, is_done
from metatuner.bench.collect import collect
from metatuner.bench.protocol import Protocol
from metatuner.bench.workers import Progress, run_cell
from metatuner.errors import MetatunerError

MAX_RETRIES = 3  # reruns of a task whose worker process or node died


def run_ray(protocol: Protocol, out: Path, data_dir: str | None = None, only: list[str] | None = None,
            address: str | None = None, cpus_per_cell: float = 1, gpus_per_cell: float = 0) -> list[dict]:
    """Runs every unfinished tuning job and cell of ``protocol`` as Ray tasks; returns the rows of ``results.json``.

    Args:
        protocol: what to run.
        out: the grid folder, on a filesystem every node of the cluster shares.
        data_dir: the folder of every task's data (on the shared filesystem), or None for each task's default.
        only: run only these methods' cells and tuning jobs.
        address: the cluster to join (``auto``: the one ``ray start`` runs on this node; ``host:port``); None
            starts a cluster on this machine, unless this process is connected to one already.
        cpus_per_cell: the CPUs each task reserves (torch's threads in the task).
        gpus_per_cell: the GPUs each task reserves (fractions share a GPU).

    Returns:
        The rows of ``results.json``.
    """
    ray = require(cpus_per_cell, gpus_per_cell)
    out = out.resolve()  # the tasks may run on other nodes, in other working folders
    data_dir = str(Path(data_dir).resolve()) if data_dir else None
    connect = not ray.is_initialized()
    if connect:
        ray.init(address=address)
    try:
        return _run(ray, protocol, out, data_dir, only, cpus_per_cell, gpus_per_cell)
    finally:
        if connect:
            ray.shutdown()


def require(cpus_per_cell: float, gpus_per_cell: float):
    """The ``ray`` module, once the resources per cell are checked; a one-line error when Ray is not installed."""
    if cpus_per_cell <= 0 or gpus_per_cell < 0:
        raise MetatunerError(f"a Ray cell needs more than 0 CPUs and at least 0 GPUs, got {cpus_per_cell} CPUs "
                             f"and {gpus_per_cell} GPUs")
    try:
        import ray
    except ImportError:
        raise MetatunerError("the Ray backend needs Ray: pip install 'metatuner[ray]'") from None
    return ray


def _run(ray, protocol: Protocol, out: Path, data_dir: str | None, only: list[str] | None, cpus: float,
         gpus: float) -> list[dict]:
    # resources given to ray.remote itself, not .options(): then a task that reserves a GPU gets a worker process
    # of its own that exits after it (Ray's max_calls=1), and the GPU memory torch cached goes with it
    options = {"num_cpus": cpus, "num_gpus": gpus, "max_retries": MAX_RETRIES}
    tune_job, run_one = ray.remote(**options)(_tuning_task), ray.remote(**options)(_cell_task)
    logs = files.make_dirs(out / "logs")
    tuned, what = {}, {}  # (task, method) -> its tuning task; task -> what it does, for messages
    for task, method in tuning.tuning_pending(protocol, out, only):
        name = f"tuning--{file_name(task)}--{method}"
        ref = tune_job.options(name=name).remote(protocol, out, data_dir, task, method, cpus)
        tuned[(task, method)], what[ref] = ref, name
    cells = protocol.cells(only)
    for i, (task, method, seed) in enumerate(cells, 1):
        if is_done(out, task, method, seed):
            continue
        name, label = cell_dir(out, task, method, seed).name, f"[{i}/{len(cells)}] {task} {method} seed {seed}"
        # a cell of a tuned method waits for its tuning task's result (the choice on file) before it starts
        ref = run_one.options(name=name).remote(
            protocol, out, data_dir, task, method, seed, label, cpus, tuned.get((task, method)))
        what[ref] = name
    resources = ray.cluster_resources()
    bar = Progress(protocol, out, only, f"Ray, {resources.get('CPU', 0):g} CPUs {resources.get('GPU', 0):g} GPUs, "
                   f"logs in {logs}")
    running, errors = list(what), []
    try:
        while running:
            if interrupts.requested() is not None:
                _stop(ray, running)
                interrupts.check(f"(and its Ray tasks); finished cells are kept in {out}; rerun the same command "
                                 "to continue")
            finished, running = ray.wait(running, num_returns=1, timeout=1.0)
            for ref in finished:
                try:
                    ray.get(ref)
                except ray.exceptions.RayError as e:  # the others go on, as local workers do
                    errors.append(_failure(ray, what[ref], e, logs))
                if not what[ref].startswith("tuning--"):
                    collect(out)
            bar.tick()
    except KeyboardInterrupt:  # a second signal while stopping: stop at once
        _stop(ray, running)
        raise
    bar.close()
    if errors:
        raise errors[0]
    return collect(out)


def _stop(ray, running: list) -> None:
    """Ends the tasks at once: their worker processes exit as after kill -9, which every write in a grid folder
    survives (the kernel releases their claims; the next run takes them over and clears what was half-written)."""
    for ref in running:
        ray.cancel(ref, force=True)
    ray.wait(running, num_returns=len(running), timeout=60)


def _failure(ray, name: str, e: Exception, logs: Path) -> MetatunerError:
    """The one-line error of a task that failed: the error it raised, or its worker's death."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, MetatunerError):
        return cause
    if isinstance(e, ray.exceptions.RayTaskError) and cause is not None:
        return MetatunerError(f"Ray task {name} failed: {type(cause).__name__}: {cause} (see {logs / name}.log)")
    return MetatunerError(f"Ray task {name} failed: {type(e).__name__} after {MAX_RETRIES} reruns "
                          f"(see {logs / name}.log)")


@contextlib.contextmanager
def _task(out: Path, name: str, cpus: float) -> Iterator[None]:
    """A task's surroundings: its output appended to ``logs/<name>.log`` after a line saying where it runs,
    torch on its reserved CPUs."""
    import ray
    import torch

    torch.set_num_threads(max(1, math.floor(cpus)))
    gpus = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
    with (out / "logs" / f"{name}.log").open("a") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        print(f"[ray] {name}: pid {os.getpid()} on {socket.gethostname()}, {torch.get_num_threads()} threads, "
              f"GPUs {','.join(gpus) or 'none'}", flush=True)
        yield


def _tuning_task(protocol: Protocol, out: Path, data_dir: str | None, task: str, method: str, cpus: float) -> None:
    """A Ray task: one tuning job, claimed; when another process holds it, waits for its choice (and runs it,
    should that process die)."""
    with _task(out, f"tuning--{file_name(task)}--{method}", cpus):
        quiet = False
        while tuning.tune_job(protocol, out, data_dir, task, method, quiet=quiet) is None:
            quiet = True
            time.sleep(5)


def _cell_task(protocol: Protocol, out: Path, data_dir: str | None, task: str, method: str, seed: int, label: str,
               cpus: float, after: Any = None) -> str:
    """A Ray task: one cell, as a local grid process runs it (``after``: its tuning task's result, unused)."""
    with _task(out, cell_dir(out, task, method, seed).name, cpus):
        if is_done(out, task, method, seed):
            print(f"{label}: done, skipped")
            return "done"
        if protocol.tune and method in protocol.tune.methods:  # tuned by a process outside this grid, maybe
            tuning.await_tuning(protocol, out, data_dir, task, method)
        return run_cell(protocol, out, data_dir, task, method, seed, label)
