"""Benchmarks: one module per task, each registered by name in ``TASKS``.

Importing this package registers every task, so ``get_task("gsm8k")`` works after ``import metatuner.tasks``.
"""

from metatuner.tasks import arithmetic, cosmosqa, gsm8k, hotpotqa, math, numeric  # noqa: F401 - registers
from metatuner.tasks.base import TASKS, Example, HubSource, Task, get_task, read_jsonl

__all__ = ["TASKS", "Example", "HubSource", "Task", "get_task", "read_jsonl"]
