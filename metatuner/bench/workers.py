"""Running a grid's cells: the one per-cell job every backend runs, in this process or in local worker processes.

:func:`run_cell` is a cell's whole job: claim it (:mod:`metatuner.bench.cells`), clear what a process that
died in it left, fit and score the method (``eval_method``), record the cell's timing, release. A method
that fails writes ``errors/<cell>.json`` and the grid goes on; a config or input error stops it. A local
grid process (:func:`run_local`) runs every unfinished cell in order, after the tuning jobs; ``--workers N``
starts N such processes on one folder (:func:`run_workers`), and a Ray task runs :func:`run_cell` on a
cluster (:mod:`metatuner.bench.ray_backend`). A SIGTERM or SIGINT stops a local grid at the next safe point
of the cell in progress (:mod:`metatuner.interrupts`): finished cells stay, the interrupted one is
released, and rerunning the same command continues.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import yaml

from metatuner import files, interrupts
from metatuner.bench import tuning
from metatuner.bench.cells import cell_dir, claim, file_name, is_done
from metatuner.bench.collect import collect
from metatuner.bench.protocol import Protocol, to_protocol_dict
from metatuner.errors import MetatunerError


def run_cell(protocol: Protocol, out: Path, data_dir: str | None, task: str, method: str, seed: int,
             label: str) -> str:
    """Runs one cell under its claim, with the value tuning chose for its method (which must be on file, if
    the method is tuned).

    Args:
        protocol: the grid's protocol.
        out: the grid folder.
        data_dir: the folder of every task's data, or None for each task's default.
        task, method, seed: the cell.
        label: what the cell's progress lines start with (``[3/12] arithmetic sft seed 0``).

    Returns:
        ``"ran"`` (results written), ``"failed"`` (the method raised: ``errors/<cell>.json`` written),
        ``"held"`` (another live process holds the cell) or ``"done"`` (finished by another process).
    """
    from metatuner.recipes import eval_method

    folder = cell_dir(out, task, method, seed)
    held = claim(out, folder)
    if held is None:
        print(f"{label}: running in another process, skipped")
        return "held"
    files.sweep(folder)  # what a process that died while writing this cell left
    if (folder / "summary.json").is_file():  # finished by another process just before the claim
        held.release()
        return "done"
    cfg = protocol.config(task, method, seed, tuning.chosen(out, file_name(task), method))
    if data_dir:
        cfg.data.data_dir = data_dir
    print(f"{label} ...", flush=True)
    start = time.perf_counter()
    try:
        # a cell an earlier process left unfinished continues from its last checkpoint (MetaTuner), with the
        # learning-curve points it scored; other methods start it over
        results = eval_method(cfg, folder, resume=True)
        total = time.perf_counter() - start
        scoring = sum(r.seconds for r in results)
        files.write_json(folder / "cell.json", {"total_seconds": total, "fit_seconds": total - scoring,
                                                "eval_seconds": scoring}, indent=None)
        for result in results:
            print(f"    {result.line()}", flush=True)
        return "ran"
    except MetatunerError:
        raise
    except interrupts.Stopped as e:
        raise interrupts.Stopped(e.signum, f"in cell {folder.name} ({e.detail}); finished cells are kept in "
                                 f"{out}; rerun the same command to continue") from None
    except Exception as e:  # noqa: BLE001 - one failed cell must not lose the rest of the grid
        error = {"task": task, "method": method, "seed": seed, "error": f"{type(e).__name__}: {e}",
                 "traceback": traceback.format_exc(), "seconds": time.perf_counter() - start}
        files.write_json(out / "errors" / f"{folder.name}.json", error)
        print(f"    FAILED: {error['error']} (see {out / 'errors'})", flush=True)
        return "failed"
    finally:
        held.release()


def run_local(protocol: Protocol, out: Path, data_dir: str | None = None, only: list[str] | None = None) -> list[dict]:
    """Runs every unfinished cell in this process, in order, after the tuning jobs no other process holds;
    returns the rows of ``results.json``."""
    # before the cells: every tuning run not on file and not claimed by another process (a worker)
    tuning.tune(protocol, out, data_dir, only)
    waiting = set(tuning.tuning_pending(protocol, out, only))  # tuned by another worker right now
    cells = sorted(protocol.cells(only), key=lambda c: (c[0], c[1]) in waiting)  # those cells go last
    for i, (task, method, seed) in enumerate(cells, 1):
        interrupts.check(f"before cell {i} of {len(cells)}; finished cells are kept in {out}; rerun the same "
                         "command to continue")
        label = f"[{i}/{len(cells)}] {task} {method} seed {seed}"
        if is_done(out, task, method, seed):
            print(f"{label}: done, skipped")
            continue
        if (task, method) in waiting:  # the cell needs the choice: wait for it (or tune it, if its tuner died)
            tuning.await_tuning(protocol, out, data_dir, task, method)
        if run_cell(protocol, out, data_dir, task, method, seed, label) in ("ran", "failed"):
            collect(out)
    return collect(out)


def run_workers(protocol: Protocol, out: Path, data_dir: str | None, only: list[str] | None,
                workers: int) -> list[dict]:
    """Starts ``workers`` grid processes on ``out`` (each claims tuning jobs, then cells, as it goes), shows
    progress over all of them, and waits. Each worker's output goes to ``out/logs/worker-<k>.log``; CPU threads are
    split between them unless ``OMP_NUM_THREADS`` is set."""
    logs = files.make_dirs(out / "logs")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    # the workers read this process's protocol from a file of its own: another bench command on the same folder
    # may rewrite protocol.yaml while they run
    own = logs / f"protocol-{os.getpid()}.yaml"
    files.write_text(own, yaml.safe_dump(to_protocol_dict(protocol), sort_keys=False))
    cmd = [sys.executable, "-m", "metatuner.cli", "bench", "--config", str(own), "--out", str(out), "--no-report"]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    if only:
        cmd += ["--only", *only]
    procs = []
    for k in range(workers):
        with (logs / f"worker-{k}.log").open("a") as log:
            # a session of its own: a signal reaches a worker once, forwarded by this process, never twice
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
            time.sleep(1.0)  # staggered starts: each claims a different first cell
    bar = Progress(protocol, out, only, f"{workers} workers, logs in {logs}")
    try:
        while any(p.poll() is None for p in procs):
            signum = interrupts.requested()
            if signum is not None:  # each worker stops at its next safe point and releases its cell
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signum)
                for p in procs:
                    p.wait()
                interrupts.check(f"(and its {workers} workers); finished cells are kept in {out}; rerun the "
                                 "same command to continue")
            time.sleep(1)
            bar.tick()
    except KeyboardInterrupt:  # a second signal: stop the workers at once
        for p in procs:
            p.kill()
        raise
    bar.close()
    failed = [k for k, p in enumerate(procs) if p.returncode != 0]
    if failed:
        raise MetatunerError(f"grid worker(s) {failed} exited with an error; see {logs}")
    return collect(out)


class Progress:
    """A progress bar over a grid's tuning jobs and cells, read from the folder (whoever does the work).

    On a terminal it ticks every second; in a log file (nohup, CI) it writes a line per finished job only, not
    one per second for hours."""

    def __init__(self, protocol: Protocol, out: Path, only: list[str] | None, where: str):
        from tqdm.auto import tqdm

        self.out, self.cells, self.jobs = out, protocol.cells(only), tuning.tuning_jobs(protocol, only)
        what = "tuning jobs + cells" if self.jobs else "cells"
        self.bar = tqdm(total=len(self.cells) + len(self.jobs), initial=self.done(), desc=f"{what} ({where})",
                        unit="job")
        self.tty = sys.stderr.isatty()

    def done(self) -> int:
        return (sum(is_done(self.out, *c) for c in self.cells)
                + sum(tuning.choice_file(self.out, t, m).is_file() for t, m in self.jobs))

    def tick(self) -> None:
        finished = self.done()
        if self.tty or finished != self.bar.n:
            self.bar.update(finished - self.bar.n)

    def close(self) -> None:
        self.bar.update(self.done() - self.bar.n)
        self.bar.close()
