"""A full disk (ENOSPC raised from the write path) and a read-only output folder: each command stops with
one error line and exit code 2; what was there before is intact, nothing half-written is left, and a
training run stopped by a full disk resumes to the same end as an uninterrupted one."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from faults.conftest import copy_run, half_written, inject, leftovers, record, snapshot, train_argv, train_state
from metatuner import files
from metatuner.cli import main

NO_SPACE = os.strerror(errno.ENOSPC)


@contextmanager
def disk_full_from(write: int):
    """The ``write``-th write of the crash-safe write path, and every one after it, fails with ENOSPC."""
    real, calls = files._write_all, {"n": 0}

    def full(fd, data):
        calls["n"] += 1
        if calls["n"] >= write:
            raise OSError(errno.ENOSPC, NO_SPACE)
        real(fd, data)

    files._write_all = full
    try:
        yield calls
    finally:
        files._write_all = real


def fails_with_one_line(capsys, argv, reasons: tuple[str, ...]) -> str:
    """Runs the command; it must end with exit code 2 and one error line giving one of ``reasons``
    (besides progress bars, nothing else on stderr)."""
    code = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("metatuner: ")]
    assert code == 2 and len(errors) == 1 and errors[0].startswith("metatuner: error: "), err
    assert any(r in errors[0] for r in reasons) and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize("write", [1, 4, 12, 30])
def test_a_full_disk_stops_training_with_one_line_and_the_run_resumes_to_the_same_end(
        reference_train, tiny_model_dir, tmp_path, capsys, write):
    run_dir = tmp_path / "run"
    with disk_full_from(write) as calls:
        fails_with_one_line(capsys, train_argv(tiny_model_dir, run_dir, False), (NO_SPACE,))
    assert calls["n"] >= write
    inject("fault")
    assert leftovers(tmp_path) == [] or leftovers(tmp_path) == [str(run_dir / "run.lock")]
    assert main(train_argv(tiny_model_dir, run_dir, run_dir.exists())) == 0
    assert record("fault", train_state(run_dir) == reference_train[1] and half_written(tmp_path) == [])


@pytest.fixture(scope="module")
def grid(reference_train, tiny_model_dir, tmp_path_factory):
    """A finished grid of two cells (with a trained one) and a copy of the reference run, for the commands
    that read them."""
    root = tmp_path_factory.mktemp("disk")
    spec = root / "protocol.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "disk", "tasks": ["arithmetic"], "seeds": [0], "methods": {"zero-shot": {}, "cot": {}},
        "common": {"model": {"name": str(tiny_model_dir)}, "eval": {"limit": 2, "max_new_tokens": 3}},
    }))
    assert main(["bench", "--config", str(spec), "--out", str(root / "grid"), "--no-report"]) == 0
    return root, spec


def commands(root: Path, spec: Path, run_dir: Path, out: Path) -> dict[str, list[str]]:
    """Each writing command, with its output under ``out``."""
    cell = root / "grid" / "cells" / "arithmetic--zero-shot--seed0"
    return {
        "eval": ["eval", "--run", str(run_dir), "--out", str(out / "eval")],
        "bench": ["bench", "--config", str(spec), "--out", str(out / "grid"), "--no-report"],
        "generate": ["generate", "--run", str(run_dir), "--question", "What is 2 + 3?", "--output", str(out / "g.jsonl")],
        "export": ["export", "--run", str(run_dir), "--query", "What is 2 + 3?", "--out", str(out / "adapter")],
        "rescore": ["rescore", str(cell)],
        "report": ["report", str(root / "grid")],
    }


@pytest.mark.parametrize("command", ["eval", "bench", "generate", "export", "rescore", "report"])
def test_a_full_disk_leaves_earlier_files_intact(grid, reference_train, tmp_path, capsys, command):
    root, spec = grid
    run_dir = copy_run(reference_train, tmp_path / "run")
    out = tmp_path / "out"
    before = {p: snapshot(p) for p in (root / "grid", run_dir)}
    with disk_full_from(1):
        fails_with_one_line(capsys, commands(root, spec, run_dir, out)[command], (NO_SPACE,))
    inject("fault")
    # nothing written: what was there is intact, the output is at most empty folders, no leftover anywhere
    assert record("fault", {p: snapshot(p) for p in before} == before
                  and (not out.exists() or all(p.is_dir() for p in out.rglob("*")))
                  and leftovers(tmp_path) == [] and leftovers(root) == [])


@contextmanager
def read_only(folder: Path, monkeypatch):
    """``folder`` becomes read-only: by its permissions, or, for root (whom permissions do not stop), by
    making every call that would change something under it fail with EROFS."""
    folder = Path(folder)
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")] if p.is_dir()}
        for p in modes:
            p.chmod(0o555)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    inside = lambda path: os.path.abspath(os.fsdecode(path)).startswith(str(folder.resolve()))  # noqa: E731

    def refuse(real, writes=lambda *a, **k: True):
        def call(path, *args, **kwargs):
            if not isinstance(path, int) and inside(path) and writes(*args, **kwargs):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
            return real(path, *args, **kwargs)
        return call

    def refuse_two(real):
        def call(src, dst, *args, **kwargs):
            if inside(src) or inside(dst):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(dst))
            return real(src, dst, *args, **kwargs)
        return call

    writing_flags = lambda flags, *a, **k: flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)  # noqa: E731
    writing_mode = lambda mode="r", *a, **k: any(c in mode for c in "wax+")  # noqa: E731
    monkeypatch.setattr(os, "open", refuse(os.open, writing_flags))
    monkeypatch.setattr(builtins, "open", refuse(builtins.open, writing_mode))
    monkeypatch.setattr(io, "open", refuse(io.open, writing_mode))
    for name in ("mkdir", "unlink", "rmdir"):
        monkeypatch.setattr(os, name, refuse(getattr(os, name)))
    for name in ("rename", "replace", "link"):
        monkeypatch.setattr(os, name, refuse_two(getattr(os, name)))
    try:
        yield
    finally:
        monkeypatch.undo()


READ_ONLY = ("Read-only file system", "Permission denied")


@pytest.mark.parametrize("command", ["eval", "bench", "generate", "export", "rescore", "report", "train --out",
                                     "train --resume"])
def test_a_read_only_output_folder_gives_one_line_and_changes_nothing(grid, reference_train, tiny_model_dir,
                                                                      tmp_path, capsys, monkeypatch, command):
    root, spec = grid
    work = tmp_path / "work"
    run_dir = copy_run(reference_train, work / "run")
    shutil.copytree(root / "grid", work / "grid")
    argv = {**commands(work, spec, run_dir, work / "out"),
            "train --out": train_argv(tiny_model_dir, work / "new-run", False),
            "train --resume": train_argv(tiny_model_dir, run_dir, True)}[command]
    before = snapshot(work)
    with read_only(work, monkeypatch):
        fails_with_one_line(capsys, argv, READ_ONLY)
    inject("fault")
    assert record("fault", snapshot(work) == before)  # nothing written


def test_log_lines_cut_by_a_full_disk_are_removed(tmp_path):
    log = files.JsonLog(tmp_path / "log.jsonl")
    log.write({"step": 1})
    with disk_full_from(1), pytest.raises(Exception, match=NO_SPACE):
        log.write({"step": 2})
    inject("fault")
    log.write({"step": 3})
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert record("fault", [json.loads(line) for line in lines] == [{"step": 1}, {"step": 3}])
