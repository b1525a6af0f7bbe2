"""The fault-injection suite's shared pieces: the tally printed at the end, and checks of folders.

Every test here injects faults (kill -9, SIGTERM, a full disk, a read-only folder, damaged checkpoints)
or feeds bad input, and counts in ``TALLY`` what it injected (:func:`inject`) and, where it checks the
outcome, whether that outcome was verified (:func:`record`): results, records and checkpoints equal to an
uninterrupted reference run bit for bit, or, for a failure, nothing written. Only verified outcomes are
counted as survived or handled, so those counts can fall short of what was injected or tried (issue 20);
they are printed at the end of the run (the closing note of issue 12 quotes them).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from metatuner.training.checkpoint import STEP_DIR, latest_checkpoint, verify


# ---- the tally ----------------------------------------------------------------------------------------
def pytest_configure(config):
    # hypothesis keeps a cache in ./.hypothesis; the suite writes nothing into the source tree
    from hypothesis.configuration import set_hypothesis_home_dir

    config._hypothesis_home = tempfile.mkdtemp(prefix="hypothesis-")
    set_hypothesis_home_dir(config._hypothesis_home)


def pytest_unconfigure(config):
    shutil.rmtree(getattr(config, "_hypothesis_home", ""), ignore_errors=True)


# what a crash may leave behind while writing: files.py's temporaries, checkpoint holds, locks, claims
LEFTOVER = re.compile(r"\..+\.(tmp|old)-\d+|hold-step-\d+|run\.lock|.+\.claim")
# of those, what a process killed by SIGKILL may leave by design: its lock or claim, taken over by the next owner
STALE = re.compile(r"run\.lock|.+\.claim")


class Tally:
    """What was injected or tried, and the outcomes that a check verified.

    ``inject(kind)`` counts a fault (``kind="fault"``) or a bad input (``"bad input"``) going in;
    ``record(kind, verified)`` counts its outcome once it has been checked, and only a verified one (exactly
    ``True``) adds to "survived" / "handled". An outcome never recorded (a test that failed before its check)
    and one recorded as not verified are not counted, so the counts differ from "injected" / "tried" unless
    every outcome was checked and held.
    """

    KINDS = {"fault": ("faults injected", "faults survived"), "bad input": ("bad inputs tried", "bad inputs handled")}

    def __init__(self):
        self.counts = {name: 0 for pair in self.KINDS.values() for name in pair}
        self.pending = dict.fromkeys(self.KINDS, 0)  # injected, outcome not recorded yet
        self.unverified = dict.fromkeys(self.KINDS, 0)  # recorded as not verified

    def inject(self, kind: str, n: int = 1) -> None:
        self.counts[self.KINDS[kind][0]] += n
        self.pending[kind] += n

    def record(self, kind: str, verified: bool, n: int = 1) -> bool:
        """The outcome of ``n`` of the injected ``kind``: counted as survived / handled only if ``verified`` is
        ``True`` (a bool from the check itself, e.g. ``state == reference``). Returns ``verified``."""
        if not isinstance(verified, bool):
            raise TypeError(f"record() takes the check's bool, not {verified!r}")
        if not 0 <= n <= self.pending[kind]:
            raise ValueError(f"{n} outcome(s) of {kind} recorded, {self.pending[kind]} injected and not recorded")
        self.pending[kind] -= n
        if verified:
            self.counts[self.KINDS[kind][1]] += n
        else:
            self.unverified[kind] += n
        return verified

    def __getitem__(self, name: str) -> int:
        return self.counts[name]

    def line(self) -> str:
        c = self.counts
        return (f"faults injected: {c['faults injected']}, survived: {c['faults survived']}; "
                f"bad inputs tried: {c['bad inputs tried']}, handled: {c['bad inputs handled']}")


TALLY = Tally()
inject = TALLY.inject
record = TALLY.record


def pytest_terminal_summary(terminalreporter):
    if TALLY["faults injected"] or TALLY["bad inputs tried"]:
        terminalreporter.write_sep("-", "fault injection (issues 12 and 20: only verified outcomes count)")
        terminalreporter.write_line(TALLY.line())
        open_ = {k: TALLY.pending[k] + TALLY.unverified[k] for k in Tally.KINDS}
        if any(open_.values()):
            terminalreporter.write_line(f"outcomes not verified: {open_['fault']} fault(s), "
                                        f"{open_['bad input']} bad input(s)")


def pytest_sessionfinish(session):
    # a pytest-xdist worker hands its counts to the controller, which adds up all workers' and prints them
    # (pytest_testnodedown in tests/conftest.py)
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["fault tally"] = TALLY if isinstance(TALLY, dict) else vars(TALLY)


# ---- checks of folders --------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a folder)."""
    root = Path(root)
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def leftovers(root: Path) -> list[str]:
    """Half-written things under ``root``: temporaries, holds, locks and claims no process holds any more."""
    return [str(p) for p in Path(root).rglob("*") if LEFTOVER.fullmatch(p.name)]


def results(folder: Path) -> tuple[dict, list[dict]]:
    """A results folder's metrics and records (timing and environment left out: they differ run to run)."""
    summary = json.loads((folder / "summary.json").read_text())
    records = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
    return {"task": summary["task"], "n": summary["n"], "metrics": summary["metrics"]}, records


def log_records(path: Path) -> list[dict]:
    """A training log's records without their wall-clock fields."""
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in path.read_text().splitlines()]


def is_complete_results_folder(folder: Path, *extra: str) -> bool:
    return folder.is_dir() and sorted(p.name for p in folder.iterdir()) == sorted(
        ["config.yaml", "records.jsonl", "summary.json", *extra])


def assert_complete_results_folder(folder: Path, *extra: str) -> None:
    assert is_complete_results_folder(folder, *extra), sorted(p.name for p in folder.iterdir())


# ---- reference runs, uninterrupted ---------------------------------------------------------------------
@pytest.fixture(scope="session")
def forkserver():
    """Starts the fork server once (it imports torch, transformers and metatuner)."""
    from faults import runner

    ctx = runner.context()
    p = ctx.Process(target=_noop)
    p.start()
    p.join()
    return runner


def _noop() -> None:
    pass


TIMEOUT = 120
TRAIN = [
    "train.steps=6", "train.batch_size=2", "train.rollouts=2", "generator.max_prompt_tokens=4", "train.save_every=1",
    "train.actor_warmup_steps=2", "train.generator_warmup_queries=2", "train.generator_warmup_steps=1",
    "train.eval_every=3", "train.lr_static=0.05", "train.lr_hypernet=0.05", "eval.max_new_tokens=4",
    "data.train_limit=8", "data.val_size=2",
]


def train_argv(model_dir, run_dir, resume: bool) -> list[str]:
    """``train`` of the tiny model into ``run_dir``, or ``train --resume`` of it."""
    if resume:
        return ["train", "--resume", str(run_dir)]
    return ["train", "--model", str(model_dir), "--limit", "3", "--out", str(run_dir), *TRAIN]


def train_state(run_dir) -> dict:
    """What a finished training run holds: its newest checkpoint's tensors and state, its log, its results."""
    ckpt = latest_checkpoint(run_dir)
    state = json.loads((ckpt / "state.json").read_text())
    del state["extra"]["log_bytes"]  # the log's length: its records' wall-clock seconds differ in width
    return {"checkpoint": ckpt.name, "trainable": (ckpt / "trainable.safetensors").read_bytes(),
            "optimizer": (ckpt / "optimizer.safetensors").read_bytes(), "state": state,
            "log": log_records(run_dir / "log.jsonl"), "eval-test": results(run_dir / "eval-test")}


def half_written(root, stale_ok: bool = False) -> list[str]:
    """What is wrong under ``root``: leftovers (with ``stale_ok``, a dead process's lock or claim is not one),
    checkpoints that fail their manifest, a ``latest`` naming no folder. Empty when nothing is half-written."""
    root = Path(root)
    wrong = [p for p in leftovers(root) if not (stale_ok and STALE.fullmatch(Path(p).name))]
    for ckpt_dir in root.rglob("checkpoints"):
        steps = [p for p in ckpt_dir.iterdir() if STEP_DIR.fullmatch(p.name)]
        wrong += [f"{p}: {verify(p)}" for p in steps if verify(p) != []]
        latest = ckpt_dir / "latest"
        if not latest.is_file() or not (ckpt_dir / latest.read_text().strip()).is_dir():
            wrong.append(f"{latest} names no folder")
    return wrong


def assert_nothing_half_written(root) -> None:
    """No leftover under ``root``, every checkpoint intact, every ``latest`` naming a folder."""
    assert half_written(root) == []


@pytest.fixture(scope="session")
def reference_train(forkserver, tiny_model_dir, tmp_path_factory):
    """An uninterrupted training run (in a child process): its folder, its state, and how long it took."""
    root = tmp_path_factory.mktemp("reference")
    child = forkserver.Child(train_argv(tiny_model_dir, root / "run", False), root, root / "log")
    assert child.wait(TIMEOUT) == 0, child.output()
    return root / "run", train_state(root / "run"), time.perf_counter() - child.started


def copy_run(reference_train, dest: Path) -> Path:
    """A copy of the reference run folder to damage."""
    shutil.copytree(reference_train[0], dest)
    return dest


def protocol(tmp_path: Path, model_dir: Path) -> Path:
    """A grid of two cells, one of them trained, on the tiny model."""
    path = tmp_path / "protocol.yaml"
    path.write_text(yaml.safe_dump({
        "name": "faults", "tasks": ["arithmetic"], "seeds": [0],
        "methods": {"zero-shot": {}, "sft": {"train.steps": 2}},
        "common": {"model": {"name": str(model_dir)}, "eval": {"limit": 3, "max_new_tokens": 4, "batch_size": 1},
                   "data": {"train_limit": 6, "val_size": 2},
                   "train": {"batch_size": 2, "rollouts": 2, "actor_warmup_steps": 1, "generator_warmup_queries": 2,
                             "generator_warmup_steps": 1, "save_every": 1},
                   "generator": {"max_prompt_tokens": 4}},
    }))
    return path


def grid_state(out) -> dict:
    """What a finished grid holds: its rows (without timing), each cell's records, each training log."""
    rows = json.loads((out / "results.json").read_text())
    drop = {"eval_seconds", "fit_seconds", "environment"}
    cells = sorted(p for p in (out / "cells").iterdir() if not p.name.endswith("-train"))
    for cell in cells:
        assert_complete_results_folder(cell, "cell.json", "budget.json")
    return {"rows": [{k: v for k, v in r.items() if k not in drop} for r in rows],
            "records": {p.name: results(p)[1] for p in cells},
            "logs": {p.name: log_records(p / "log.jsonl") for p in (out / "cells").glob("*-train")}}


@pytest.fixture(scope="session")
def reference_grid(forkserver, tiny_model_dir, tmp_path_factory):
    """An uninterrupted ``bench`` of :func:`protocol` (in a child process): the protocol file, the grid's
    state, and how long it took."""
    root = tmp_path_factory.mktemp("reference-grid")
    spec = protocol(root, tiny_model_dir)
    child = forkserver.Child(["bench", "--config", str(spec), "--out", str(root / "grid"), "--no-report"], root,
                             root / "log")
    assert child.wait(TIMEOUT) == 0, child.output()
    return spec, grid_state(root / "grid"), time.perf_counter() - child.started
