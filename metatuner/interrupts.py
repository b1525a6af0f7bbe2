"""Stopping at a safe point on SIGTERM (a scheduler's notice before it kills a job) or SIGINT (Ctrl-C).

Inside :func:`stop_at_safe_points` the first signal only records a request; the long-running loops call
:func:`check` (or read :func:`requested`) at their safe points: the trainer after each optimizer step
(it saves a checkpoint first), the evaluation harness between batches, the grid between cells. They raise
:class:`Stopped`, which the CLI turns into one line and the exit code ``128 + signal``: 143 for SIGTERM,
130 for SIGINT. A second signal acts as it would without this module (SIGINT raises
``KeyboardInterrupt``, SIGTERM ends the process at once).
"""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_requested: int | None = None


class Stopped(BaseException):
    """A stop at a safe point after a signal. A BaseException, like KeyboardInterrupt: code that catches
    ``Exception`` to carry on after a failure (a grid cell, a BetterTogether step) must not swallow it."""

    def __init__(self, signum: int, detail: str):
        super().__init__(f"stopped by {signal.Signals(signum).name} {detail}")
        self.signum, self.detail = signum, detail

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _on_signal(signum, frame) -> None:
    global _requested
    _requested = signum
    for s in SIGNALS:
        signal.signal(s, _previous[s])  # a second signal acts as usual
    print(f"metatuner: {signal.Signals(signum).name} received; stopping at the next safe point "
          "(send it again to stop at once)", file=sys.stderr, flush=True)


_previous: dict[int, object] = {}


@contextmanager
def stop_at_safe_points() -> Iterator[None]:
    """Within this block SIGTERM and SIGINT request a stop at the next safe point (main thread only)."""
    global _requested
    _previous.update({s: signal.getsignal(s) for s in SIGNALS})
    saved = dict(_previous)
    for s in SIGNALS:
        signal.signal(s, _on_signal)
    try:
        yield
    finally:
        for s in SIGNALS:
            signal.signal(s, saved[s])
        _requested = None


def requested() -> int | None:
    """The signal that asked to stop, or None."""
    return _requested


def check(detail: str) -> None:
    """Raises :class:`Stopped` when a stop was requested; ``detail`` says where and what was kept."""
    signum = requested()
    if signum is not None:
        raise Stopped(signum, detail)
