"""Benchmarks: one module per task, each registered by name in ``TASKS``.

Importing this package registers every task, so ``get_task("gsm8k")`` works after ``import metatuner.tasks``;
``get_task("file:spec.yaml")`` reads a task defined by a spec file (``metatuner.tasks.spec``).
``get_task`` lives here, above the task modules and the cross-task mix, so that ``base`` (which they all
import) never imports any of them.
"""

from __future__ import annotations

import os

from metatuner.config import TASK_FILE_PREFIX
from metatuner.errors import MetatunerError
from metatuner.tasks import arithmetic, cosmosqa, gsm8k, hotpotqa, math, mixture, numeric  # noqa: F401 - registers
from metatuner.tasks.base import TASKS, Example, HubSource, Task, read_jsonl
from metatuner.tasks.cross import parse_cross
from metatuner.tasks.spec import SpecTask


def get_task(name: str, data_dir: str | os.PathLike | None = None) -> Task:
    """A registered task by name, a task spec file (``file:spec.yaml``), or a cross-task mix of them such as
    ``math+hotpotqa>gsm8k``."""
    if ">" in name:
        return parse_cross(name, data_dir, _single_task)
    return _single_task(name, data_dir)


def _single_task(name: str, data_dir: str | os.PathLike | None) -> Task:
    if name.startswith(TASK_FILE_PREFIX):
        return SpecTask(name.removeprefix(TASK_FILE_PREFIX), data_dir)
    if name.startswith("mixture-"):  # the mixture cut to some of its families
        return mixture.Mixture.of_families(name, data_dir)
    try:
        return TASKS.get(name)(data_dir=data_dir)
    except MetatunerError as e:
        raise MetatunerError(f"{e}; or a task spec file as {TASK_FILE_PREFIX}PATH.yaml") from None


__all__ = ["TASKS", "Example", "HubSource", "SpecTask", "Task", "get_task", "read_jsonl"]
