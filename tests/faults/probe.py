"""A fork-server child's target in a module that imports nothing heavy: what it finds imported on arrival was
imported by the server (see :data:`faults.runner.PRELOAD`)."""

import sys
from pathlib import Path


def imported(path: str, names: list[str]) -> None:
    Path(path).write_text("\n".join(m for m in names if m in sys.modules))
