"""Cross-task transfer: train on several tasks together, test on another (the paper's cross-task test).

``get_task("math+hotpotqa+cosmosqa>gsm8k")`` gives a task whose train split is the union of the train
splits of the tasks left of ``>`` and whose test split is the test split of the task on its right.
Every example remembers where it came from (``meta["task"]``), and keeps its own task's initial
instruction ``p~`` and its own answer extraction and metric, so a MATH item is still graded by its
``\\boxed{}`` answer while the test items are graded as GSM8K. Reports use the test task's metrics; on
training items (a validation split carved from train) the test task's primary metric name carries each
item's own task's primary score.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

from metatuner.errors import MetatunerError
from metatuner.tasks.base import TASKS, Example, Task

SYNTAX = "train tasks joined by '+', then '>' and the test task, e.g. math+hotpotqa+cosmosqa>gsm8k"


class CrossTask(Task):
    def __init__(self, train_tasks: list[Task], test_task: Task):
        super().__init__(test_task.data_dir)
        self.sources = {t.name: t for t in [*train_tasks, test_task]}
        self.train_tasks, self.test_task = train_tasks, test_task
        self.name = f"{'+'.join(t.name for t in train_tasks)}>{test_task.name}"
        # the test task's settings describe the task as a whole (reports, budgets, baselines' prompt)
        for attr in ("instruction", "cot_instruction", "max_new_tokens", "cot_max_new_tokens", "stop",
                     "primary_metric", "version", "splits", "required_fields", "query_fields", "template",
                     "answer_field", "metric"):
            setattr(self, attr, getattr(test_task, attr))

    def load(self, split: str) -> list[Example]:
        tasks = self.train_tasks if split == "train" else [self.test_task]
        out = []
        for task in tasks:
            out += [dataclasses.replace(ex, meta={**ex.meta, "task": task.name}) for ex in task.load(split)]
        return out

    def source(self, example: Example) -> Task:
        return self.sources[example.meta.get("task", self.test_task.name)]

    def instruction_for(self, example: Example) -> str:
        return self.source(example).instruction

    def grade(self, output: str, example: Example) -> tuple[dict[str, str | None], dict[str, float]]:
        """The example's own task grades it; an item of a training task also gets its task's primary score
        under the mix's primary metric name, so a validation split carved from the training mix (model
        selection, OPRO and BetterTogether scoring, ``em`` rewards) has one metric across its tasks."""
        source = self.source(example)
        extracted, scores = source.grade(output, example)
        if source is not self.test_task:
            scores = {**scores, self.primary_metric: scores[source.primary_metric]}
        return extracted, scores

    def choices(self, example: Example) -> list[str] | None:
        return self.source(example).choices(example)

    def messages(self, instruction: str, example: Example) -> list[dict[str, str]]:
        return self.source(example).messages(instruction, example)

    def card(self) -> dict[str, Any]:
        return {"name": self.name, "train_tasks": [t.name for t in self.train_tasks], "test_task": self.test_task.card()}

    def query_example(self, row: dict[str, Any], where: str, line: int) -> Example:
        """A query to answer (``predict``, ``serve``) is one of the test task's."""
        return self.test_task.query_example(row, where, line)

    # a cross task grades through its sources; these are the test task's, for callers that need them
    def example_from_row(self, row: dict[str, Any]) -> Example:
        return self.test_task.example_from_row(row)

    def extract(self, output: str) -> dict[str, str | None]:
        return self.test_task.extract(output)

    def score(self, extracted: dict[str, str | None], example: Example) -> dict[str, float]:
        return self.source(example).score(extracted, example)


def parse_cross(name: str, data_dir: str | os.PathLike | None,
                resolve: Callable[[str, str | os.PathLike | None], Task] | None = None) -> CrossTask:
    """The mix ``name``; ``resolve(part, data_dir)`` makes each part's task (default: the registered task)."""
    resolve = resolve or (lambda part, folder: TASKS.get(part)(data_dir=folder))
    train_part, _, test_part = name.partition(">")
    train_names = [n.strip() for n in train_part.split("+") if n.strip()]
    if not train_names or not test_part.strip() or ">" in test_part:
        raise MetatunerError(f"bad cross-task name {name!r}; expected {SYNTAX}")
    return CrossTask([resolve(n, data_dir) for n in train_names], resolve(test_part.strip(), data_dir))
