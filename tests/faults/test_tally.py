"""The tally itself (issue 20): "survived" and "handled" count only outcomes a check verified, so they are not
"injected" and "tried" by construction."""

from __future__ import annotations

import pytest

from faults.conftest import Tally


def test_an_outcome_that_was_not_verified_is_not_counted():
    tally = Tally()
    tally.inject("fault", 3)
    for _ in range(4):
        tally.inject("bad input")
    assert tally.record("fault", True) is True
    assert tally.record("fault", False, 2) is False  # e.g. a rerun's results differing from the reference
    assert tally.record("bad input", True, 3) and not tally.record("bad input", 1 == 2)
    assert tally.line() == "faults injected: 3, survived: 1; bad inputs tried: 4, handled: 3"
    assert tally.unverified == {"fault": 2, "bad input": 1} and tally.pending == {"fault": 0, "bad input": 0}


def test_an_outcome_never_recorded_is_not_counted():
    """A test that injects and stops before its check (it failed, or never compared) counts nothing survived."""
    tally = Tally()
    tally.inject("fault", 2)
    tally.record("fault", True)
    assert tally["faults injected"] == 2 and tally["faults survived"] == 1 and tally.pending["fault"] == 1


def test_only_a_check_s_own_bool_counts_and_never_more_outcomes_than_injected():
    tally = Tally()
    tally.inject("fault")
    with pytest.raises(TypeError):
        tally.record("fault", ["a leftover"])  # a truthy non-bool: write `== []`, not the list
    with pytest.raises(TypeError):
        tally.record("fault", None)  # an assert-style helper returns None: not a verification
    with pytest.raises(ValueError):
        tally.record("fault", True, 2)
    with pytest.raises(ValueError):
        tally.record("bad input", True)  # nothing tried
    assert tally["faults survived"] == 0 and tally.pending["fault"] == 1
