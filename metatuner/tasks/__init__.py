"""Benchmarks: one module per task, each registered by name in ``TASKS``.

Importing this package registers every task, so ``get_task("gsm8k")`` works after ``import metatuner.tasks``.
``get_task`` lives here, above the task modules and the cross-task mix, so that ``base`` (which they all
import) never imports any of them.
"""

from __future__ import annotations

import os

from metatuner.tasks import arithmetic, cosmosqa, gsm8k, hotpotqa, math, mixture, numeric  # noqa: F401 - registers
from metatuner.tasks.base import TASKS, Example, HubSource, Task, read_jsonl
from metatuner.tasks.cross import parse_cross


def get_task(name: str, data_dir: str | os.PathLike | None = None) -> Task:
    """Instantiates a registered task by name, or a cross-task mix such as ``math+hotpotqa>gsm8k``."""
    if ">" in name:
        return parse_cross(name, data_dir)
    return TASKS.get(name)(data_dir=data_dir)


__all__ = ["TASKS", "Example", "HubSource", "Task", "get_task", "read_jsonl"]
