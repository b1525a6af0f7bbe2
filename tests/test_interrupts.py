"""Stopping at a safe point: the first signal is a request, the second acts as usual.

The signals are raised with ``signal.raise_signal``: delivered to this (the main) thread, whose Python handler
has run when the call returns. ``os.kill(os.getpid(), ...)`` may hand the signal to another thread (pytest-xdist's
workers have several), and the handler then runs at some later point of the main thread."""

import signal

import pytest

from metatuner import interrupts


def test_the_first_signal_asks_the_second_stops_and_handlers_are_restored_after():
    # Python's own SIGINT handler, as a command starts with (a pytest-xdist worker ignores SIGINT)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = signal.getsignal(signal.SIGINT)
        with interrupts.stop_at_safe_points():
            interrupts.check("nothing asked yet")
            signal.raise_signal(signal.SIGINT)
            assert interrupts.requested() == signal.SIGINT
            with pytest.raises(interrupts.Stopped, match="stopped by SIGINT at step 3") as e:
                interrupts.check("at step 3")
            assert e.value.exit_code == 130
            with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C does not wait for the safe point
                signal.raise_signal(signal.SIGINT)
        assert interrupts.requested() is None and signal.getsignal(signal.SIGINT) is before
    finally:
        signal.signal(signal.SIGINT, outer)
    assert issubclass(interrupts.Stopped, BaseException) and not issubclass(interrupts.Stopped, Exception)
