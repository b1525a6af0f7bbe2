"""The benchmark grid: methods x tasks x seeds under one protocol, resumable cell by cell, on any backend.

Each cell is one ``eval_method`` run: the method is fitted on the task's train split (validation carved
from train, seeded) and scored on the same test subset by the one evaluation harness; with several test
splits (``eval.splits``) it is fitted once and scored on each, the first split's results being the cell's
folder and each other split's going beside it (``<cell>@test_shift``), written before it. The pieces:

- :mod:`~metatuner.bench.protocol`: what to run (tasks, seeds, methods, overrides, tuning);
- :mod:`~metatuner.bench.cells`: the grid folder's layout and the claims that give each cell one owner;
- :mod:`~metatuner.bench.tuning`: fair tuning of the learning rates, before the cells that need it;
- :mod:`~metatuner.bench.workers`: the per-cell job, run here or in local worker processes;
- :mod:`~metatuner.bench.ray_backend`: the same jobs as Ray tasks on a cluster;
- :mod:`~metatuner.bench.collect`: ``results.json`` rebuilt from the finished cells.

Every backend runs the same per-cell code under the same claims and writes the same folder layout, so a
grid started by one backend can be resumed by another, and separate invocations may share a folder.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from metatuner import files
from metatuner.bench.protocol import Protocol, to_protocol_dict
from metatuner.bench.workers import run_local, run_workers

BACKENDS = ("local", "ray")


def run_grid(protocol: Protocol, out: Path, data_dir: str | None = None, only: list[str] | None = None,
             workers: int = 1, backend: str = "local", address: str | None = None, cpus_per_cell: float = 1,
             gpus_per_cell: float = 0) -> list[dict]:
    """Runs every unfinished tuning job and cell of ``protocol`` into grid folder ``out``.

    Args:
        protocol: what to run.
        out: the grid folder; what is finished there is kept, so a rerun continues.
        data_dir: the folder of every task's data, or None for each task's default.
        only: run only these methods' cells (and tuning jobs).
        workers: ``local`` backend: how many processes work at once (1: this process only).
        backend: ``local`` (this machine's processes) or ``ray`` (tasks on a Ray cluster).
        address: ``ray`` backend: the cluster to join (``auto``, ``host:port``); None starts one on this machine
            unless this process is already connected.
        cpus_per_cell, gpus_per_cell: ``ray`` backend: what each cell and tuning job reserves.

    Returns:
        The rows of ``results.json``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown grid backend {backend!r}; available: {', '.join(BACKENDS)}")
    if backend == "ray":  # before anything is written
        from metatuner.bench.ray_backend import require, run_ray

        require(cpus_per_cell, gpus_per_cell)
    files.make_dirs(out)
    spec = yaml.safe_dump(to_protocol_dict(protocol), sort_keys=False)
    if not (out / "protocol.yaml").is_file() or (out / "protocol.yaml").read_text() != spec:  # workers rewrite it
        files.write_text(out / "protocol.yaml", spec)
    if backend == "ray":
        return run_ray(protocol, out, data_dir, only, address, cpus_per_cell, gpus_per_cell)
    if workers > 1:  # the workers share the tuning runs out between them, then the cells
        return run_workers(protocol, out, data_dir, only, workers)
    return run_local(protocol, out, data_dir, only)
