"""A grid folder's cells and claims: where each cell's results go, and who may work on it.

A grid folder holds ``protocol.yaml``, ``cells/<task>--<method>--seed<k>/`` (one results folder per cell, and
``<cell>@<split>``, ``<cell>.b<step>``, ``<cell>-train`` beside it), ``tuning/`` (the tuning choices),
``claims/``, ``logs/``, ``errors/`` and ``results.json``. A cell's folder appears only when the cell is
complete (it is staged and renamed), so a cell is done when its ``summary.json`` is on file.

Any number of processes may work on one folder at once, on one machine or several sharing a filesystem:
local grid workers, Ray tasks, separate ``bench`` commands. A process claims a cell, or a tuning job, by
locking a file under ``claims/`` that holds its pid and host (:mod:`metatuner.locks`); it skips what
another live process holds and takes over the claims of processes that died; of several processes racing
for one claim exactly one wins.
"""

from __future__ import annotations

import re
from pathlib import Path

from metatuner import files, locks


def file_name(task: str) -> str:
    """A task name usable in a path everywhere: a cross-task mix's '>' is not allowed in Windows paths
    (``math+cosmosqa>gsm8k`` -> ``math+cosmosqa-to-gsm8k``), and a spec file counts by its name
    (``file:/data/capitals.yaml`` -> ``capitals``)."""
    return re.sub(r"file:([^+>]+)", lambda m: Path(m.group(1).strip()).stem, task).replace(">", "-to-")


def cell_dir(out: Path, task: str, method: str, seed: int) -> Path:
    """The results folder of one cell of grid folder ``out``."""
    return out / "cells" / f"{file_name(task)}--{method}--seed{seed}"


def is_done(out: Path, task: str, method: str, seed: int) -> bool:
    """Whether the cell's results folder is complete."""
    return (cell_dir(out, task, method, seed) / "summary.json").is_file()


def claim(out: Path, folder: Path | str) -> locks.Lock | None:
    """Claims a cell (its folder) or a tuning job (its name) for this process (release it with
    ``.release()``); None when another live process holds it. The claim of a process that died is taken over."""
    name = folder if isinstance(folder, str) else folder.name
    return locks.try_lock(files.make_dirs(out / "claims") / f"{name}.claim")
