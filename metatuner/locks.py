"""One owner per run folder and per grid cell: a lock file that holds its owner's process id and host.

The lock is an ``flock`` held on the file for the owner's lifetime, so the kernel releases it when the
owner dies, even by kill -9. A dead owner's file stays behind, unlocked, and the next process takes it
over; two processes racing for it cannot both win, since the kernel grants the lock to one. The owner
removes the file when it is done. Usage::

    lock = try_lock(folder / "run.lock")       # None when another live process holds it
    lock = hold(folder / "run.lock", "run folder runs/x")  # or: a one-line error naming the owner
    ...
    lock.release()
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from pathlib import Path

from metatuner.errors import MetatunerError


class Lock:
    """A held lock; :meth:`release` removes its file and lets it go."""

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = Path(path), fd

    def moved(self, path: Path) -> None:
        """The folder holding the file was renamed (a staged folder published): the lock is unchanged."""
        self.path = Path(path)

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # before letting go: nobody may lock a file that is being removed
        os.close(self._fd)
        self._fd = None


def _owner_line() -> str:
    command = " ".join(["metatuner", *sys.argv[1:3]]) if sys.argv else "metatuner"
    return f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')} ({command})\n"


def try_lock(path: Path) -> Lock | None:
    """Takes the lock at ``path`` (creating the file), or None when a live process holds it."""
    path = Path(path)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise MetatunerError(f"cannot create lock file {path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        # the owner may have removed the file between our open and our lock: then we hold a lock on a file
        # nobody else can see, and must try again on the one at ``path``
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, _owner_line().encode(), 0)
            return Lock(path, fd)
        os.close(fd)


def owner(path: Path) -> str:
    """Who holds the lock at ``path``, as its file says ("pid 12 on host since ..."), for messages."""
    try:
        text = Path(path).read_text(errors="replace").strip()
    except OSError:
        text = ""
    return text or "another process"


def hold(path: Path, what: str) -> Lock:
    """Takes the lock at ``path`` or stops with a one-line error naming ``what`` and its owner."""
    lock = try_lock(path)
    if lock is None:
        raise MetatunerError(f"{what} is in use by {owner(path)}; wait for that process to end or stop it")
    return lock
