"""One owner per run folder or grid cell: a live owner's lock is refused, a dead owner's taken over."""

import os
import subprocess
import sys

import pytest

from metatuner import locks
from metatuner.errors import MetatunerError

HOLDER = "import sys, time; from metatuner import locks; l = locks.try_lock(sys.argv[1]); print(bool(l), flush=True); time.sleep(60)"


def test_a_live_owner_is_refused_with_its_pid_and_a_dead_owners_lock_is_taken_over(tmp_path):
    path = tmp_path / "run.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "True"
        assert locks.try_lock(path) is None
        with pytest.raises(MetatunerError, match=f"run folder x is in use by pid {holder.pid} on "):
            locks.hold(path, "run folder x")
    finally:
        holder.kill()
        holder.wait()
    assert path.is_file()  # kill -9 left the file, but not the lock
    lock = locks.hold(path, "run folder x")
    assert path.read_text().startswith(f"pid {os.getpid()} on ")
    assert locks.try_lock(path) is None  # one owner, also within one process
    lock.release()
    assert not path.exists()


def test_a_lock_released_between_open_and_flock_is_taken_on_the_new_file(tmp_path, monkeypatch):
    path = tmp_path / "cell.claim"
    first = locks.try_lock(path)
    real_flock = locks.fcntl.flock
    calls = []

    def release_then_flock(fd, op):
        if not calls:  # the owner finishes right after our open: its file is gone, our fd is on it
            first.release()
        calls.append(fd)
        return real_flock(fd, op)

    monkeypatch.setattr(locks.fcntl, "flock", release_then_flock)
    second = locks.try_lock(path)
    assert second is not None and len(calls) == 2  # the first lock landed on the removed file: tried again
    assert path.is_file() and locks.try_lock(path) is None
    second.release()
