"""Small file helpers shared by the results, checkpoint and grid writers."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Writes ``text`` to a hidden sibling, then renames it over ``path``: readers (and a crash) see the
    old file or the new one, never half of one. The temporary name carries the pid, so processes writing
    the same file at once do not collide."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
