"""Batch prediction: a JSONL file of queries in, one JSON line per query out, resumable.

Each output line holds the query's id, the query, the prompt the predictor used (MetaTuner's generated one,
else p~), the output, the extracted answer, and, when the input row has the gold answer, the gold answer and
the scores. Lines are appended and flushed one by one (``metatuner.files``); a rerun skips the ids already
written and cuts off a line torn by an interruption, so no query is answered twice or lost.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from metatuner.errors import MetatunerError
from metatuner.evaluation.predictors import Prediction, Predictor
from metatuner.files import JsonlAppender, resume_jsonl
from metatuner.tasks.base import Example, Task, numbered_jsonl


def read_queries(task: Task, path: Path, field: str | None = None) -> list[Example]:
    """The queries of a JSONL file: each row's ``field`` as it is, else the query the task builds from the row's
    fields (the gold answer is kept where the row has it). Rows without an ``id`` get ``line-<n>``."""
    examples: list[Example] = []
    seen: dict[str, int] = {}
    for n, row in numbered_jsonl(path):
        row = {**row, "id": str(row.get("id", f"line-{n}"))}
        if field is None:
            example = task.query_example(row, str(path), n)
        elif field not in row:
            raise MetatunerError(f"{path}:{n}: row lacks field {field!r}; its fields: {', '.join(row)}",
                                 cli=f"{path}:{n}: row lacks field {field!r} (--field); its fields: {', '.join(row)}")
        else:
            example = Example(id=row["id"], query=str(row[field]), answer="", target="")
        if example.id in seen:
            raise MetatunerError(f"{path}:{n}: id {example.id!r} repeats line {seen[example.id]}; ids must be unique")
        seen[example.id] = n
        examples.append(example)
    if not examples:
        raise MetatunerError(f"{path}: no queries")
    return examples


def prediction_record(task: Task, example: Example, prediction: Prediction) -> dict[str, Any]:
    """One output line: id, query, prompt, output, the extracted answer, and gold and scores where known."""
    if example.answer:
        extracted, scores = task.grade(prediction.output, example)
    else:
        extracted, scores = task.extract(prediction.output), None
    record = {"id": example.id, "query": example.query, "prompt": prediction.instruction,
              "output": prediction.output, "answer": extracted["flexible"], "extracted": extracted}
    return record | ({"gold": example.answer, "scores": scores} if scores is not None else {})


def predict_file(predictor: Predictor, task: Task, input_path: Path, out_path: Path, *, field: str | None = None,
                 batch_size: int = 8, max_new_tokens: int | None = None, progress: bool = True) -> tuple[int, int]:
    """Answers every query of ``input_path`` not yet in ``out_path``; returns (queries, answered now)."""
    examples = read_queries(task, Path(input_path), field)
    done = resume_jsonl(Path(out_path))
    todo = [ex for ex in examples if ex.id not in done]
    budget = max_new_tokens or predictor.budget(task)
    bar = tqdm(total=len(examples), initial=len(examples) - len(todo), desc=f"predict {task.name}", unit="query",
               disable=not progress)
    with JsonlAppender(Path(out_path)) as sink:
        for b in range(0, len(todo), batch_size):
            batch = todo[b : b + batch_size]
            for example, prediction in zip(batch, predictor.predict(task, batch, budget), strict=True):
                sink.write(prediction_record(task, example, prediction))
            bar.update(len(batch))
    bar.close()
    return len(examples), len(todo)
