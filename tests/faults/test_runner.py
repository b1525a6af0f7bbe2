"""The fork server that the fault suite's commands run in: its children arrive with everything preloaded."""

from __future__ import annotations


def test_children_of_the_fork_server_find_torch_and_metatuner_already_imported(forkserver, tmp_path):
    """Before issue 24's fix the server was asked to preload ``faults.runner``, which it cannot import (it does
    not take pytest's ``sys.path``) and skipped silently: every child imported torch afresh, seconds a command."""
    from faults.probe import imported

    out = tmp_path / "imported"
    child = forkserver.context().Process(target=imported, args=(str(out), forkserver.PRELOAD))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    assert out.read_text().split("\n") == forkserver.PRELOAD
