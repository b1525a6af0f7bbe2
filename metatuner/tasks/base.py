"""The task interface: everything a method and the evaluation harness need to know about a benchmark.

A task turns raw rows into :class:`Example` objects, says what the model is told (the initial
instruction ``p~`` and a chain-of-thought variant), how a query is written as chat messages, how a
final answer is pulled out of a model's output (``extract``), and how that answer is scored
(``score``). Extraction and scoring are pure functions of strings, so they are tested on
hand-written outputs without any model.

New tasks subclass :class:`Task` in a module of their own and register with ``@TASKS.register``; the
built-in modules are imported by ``metatuner/tasks/__init__.py``, one of yours by ``$METATUNER_PLUGINS``
(:mod:`metatuner.plugins`).
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from metatuner import plugins
from metatuner.errors import MetatunerError
from metatuner.registry import Registry

DATA_DIR_ENV = "METATUNER_DATA_DIR"
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Example:
    """One task item.

    ``query`` is the text the model is asked about (question, plus context and options where the task
    has them); ``answer`` is the gold final answer in the form ``score`` compares against; ``target``
    is the supervised completion used for fine-tuning (a worked solution ending in the answer when the
    data has one, else the bare answer in the task's answer format).
    """

    id: str
    query: str
    answer: str
    target: str
    options: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class HubSource:
    """Where a task's data lives on the Hugging Face hub, used when no local folder is given."""

    path: str
    configs: tuple[str | None, ...] = (None,)
    splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "test": "test"})
    #: a git revision of the dataset repo, e.g. ``refs/convert/parquet`` for a script-based dataset
    #: (``datasets`` >= 4 no longer runs loading scripts)
    revision: str | None = None


class Task(ABC):
    """Base class for benchmarks. Subclasses set the class attributes and implement the three methods."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    #: the hand-written initial prompt p~ that MetaTuner rewrites per query
    instruction: ClassVar[str]
    #: the chain-of-thought variant of the instruction (the CoT baseline)
    cot_instruction: ClassVar[str]
    #: new-token budgets for the plain and the chain-of-thought instruction
    max_new_tokens: ClassVar[int] = 64
    cot_max_new_tokens: ClassVar[int] = 256
    #: generation stops at the first of these strings (the text after it is dropped)
    stop: ClassVar[tuple[str, ...]] = ()
    #: the splits ``load`` accepts (the built-in tasks add a template-shift test, ``test_shift``)
    splits: ClassVar[tuple[str, ...]] = SPLITS
    #: fields every raw row must have; each must be a string unless ``field_types`` says otherwise
    required_fields: ClassVar[tuple[str, ...]] = ()
    #: allowed JSON types of required fields that are not (only) strings, e.g. ``{"label": (int, str)}``
    field_types: ClassVar[dict[str, tuple[type, ...]]] = {"id": (str, int)}
    #: the fields a query is built from: what a row needs when it has no gold answer (``predict``)
    query_fields: ClassVar[tuple[str, ...]] = ("question",)
    #: how the query is written from those fields, the gold answer's field and the metric's name
    #: (``metatuner.tasks.metrics``): what a spec file says, so built-in tasks print in a spec's shape
    template: ClassVar[str] = "{question}"
    answer_field: ClassVar[str] = "answer"
    metric: ClassVar[str]
    #: the metric reported first (and used to pick the best checkpoint / prompt)
    primary_metric: ClassVar[str]
    hub: ClassVar[HubSource | None] = None

    def __init__(self, data_dir: str | os.PathLike | None = None):
        self.data_dir = data_dir

    # ---- what subclasses implement -------------------------------------------------------------
    @abstractmethod
    def example_from_row(self, row: dict[str, Any]) -> Example:
        """Builds an Example from a raw row that has all ``required_fields``."""

    @abstractmethod
    def extract(self, output: str) -> dict[str, str | None]:
        """Pulls the final answer out of a model output.

        Returns ``{"strict": ..., "flexible": ...}``: strict accepts only the format the instruction
        asks for; flexible falls back to a looser rule (e.g. the last number). ``None`` when nothing
        could be extracted.
        """

    @abstractmethod
    def score(self, extracted: dict[str, str | None], example: Example) -> dict[str, float]:
        """Scores extracted answers against the gold one; returns ``{metric_name: value in [0, 1]}``."""

    # ---- shared behaviour ----------------------------------------------------------------------
    def messages(self, instruction: str, example: Example) -> list[dict[str, str]]:
        """The chat messages for one query: the instruction as the system turn, the query as the user turn."""
        return [
            {"role": "system", "content": instruction},
            {"role": "user", "content": example.query},
        ]

    def instruction_for(self, example: Example) -> str:
        """The initial prompt ``p~`` for this example (one per task, except in a cross-task mix)."""
        return self.instruction

    def grade(self, output: str, example: Example) -> tuple[dict[str, str | None], dict[str, float]]:
        """Extracts the answer from ``output`` and scores it: ``(extracted, scores)``."""
        extracted = self.extract(output)
        return extracted, self.score(extracted, example)

    def card(self) -> dict[str, Any]:
        """The task in the shape of a spec file (``metatuner tasks NAME`` prints it)."""
        data = {"files": f"<data>/{self.name}/{{train,test}}.jsonl"} | ({"hub": self.hub.path} if self.hub else {})
        return {"name": self.name, "version": self.version, "data": data, "template": self.template,
                "answer": self.answer_field, "instruction": self.instruction, "max_new_tokens": self.max_new_tokens,
                "metric": self.metric, "primary_metric": self.primary_metric}

    def choices(self, example: Example) -> list[str] | None:
        """For multiple-choice tasks, the answer continuations compared by likelihood; else None."""
        return None

    def check_split(self, split: str) -> None:
        """Fails with the task's available splits when ``split`` is not one of them."""
        if split not in self.splits:
            raise MetatunerError(f"unknown split {split!r} of task {self.name!r}; available: {', '.join(self.splits)}")

    def load(self, split: str) -> list[Example]:
        """Loads a split from the local data folder if one is set, else from the Hugging Face hub."""
        self.check_split(split)
        data_dir = self.data_dir or os.environ.get(DATA_DIR_ENV)
        if data_dir:
            numbered = numbered_jsonl(Path(data_dir) / self.name / f"{split}.jsonl")
            where = str(Path(data_dir) / self.name / f"{split}.jsonl")
        else:
            rows, where = self._load_hub(split)
            numbered = list(enumerate(rows, 1))
        examples = [self.checked_example(row, where, n) for n, row in numbered]
        if not examples:
            raise MetatunerError(f"{where}: the {split} split of task {self.name!r} is empty")
        return examples

    def checked_example(self, row: dict[str, Any], where: str, line: int) -> Example:
        """The Example of one raw row; a row that lacks a field or holds one of the wrong type, or that
        ``example_from_row`` rejects, is an error naming the file and line."""
        missing = [f for f in self.required_fields if f not in row]
        if missing:
            raise MetatunerError(
                f"{where}:{line}: row lacks field(s) {', '.join(missing)} needed by task {self.name!r} "
                f"(needs: {', '.join(self.required_fields)})"
            )
        for f in self.required_fields:
            types = self.field_types.get(f, (str,))
            if isinstance(row[f], bool) or not isinstance(row[f], types):
                allowed = " or ".join({str: "a string", int: "an integer"}.get(t, t.__name__) for t in types)
                raise MetatunerError(f"{where}:{line}: field {f!r} must be {allowed}, got {row[f]!r:.60}")
        try:
            return self.example_from_row(row)
        except MetatunerError as e:
            raise MetatunerError(f"{where}:{line}: {e}") from None

    def query_example(self, row: dict[str, Any], where: str, line: int) -> Example:
        """An example from a row that may lack the gold answer (the input of ``predict``): the whole example
        when the row has every required field, else the query alone, with an empty answer."""
        if all(f in row for f in self.required_fields):
            return self.checked_example(row, where, line)
        missing = [f for f in self.query_fields if f not in row]
        if missing:
            raise MetatunerError(
                f"{where}:{line}: row lacks field(s) {', '.join(missing)} that the queries of task {self.name!r} "
                f"are made of (needs: {', '.join(self.query_fields)})"
            )
        return self.unlabelled_example(row)

    def unlabelled_example(self, row: dict[str, Any]) -> Example:
        """The query of a row that has the ``query_fields`` but no answer (override when the query is built
        from several fields)."""
        return Example(id=str(row["id"]), query=str(row[self.query_fields[0]]), answer="", target="")

    def _load_hub(self, split: str) -> tuple[list[dict[str, Any]], str]:
        if self.hub is None:
            raise MetatunerError(
                f"task {self.name!r} has no hub source; give a data folder (data_dir, or {DATA_DIR_ENV})",
                cli=f"task {self.name!r} has no hub source; give a data folder with --data-dir or {DATA_DIR_ENV}")
        where = f"hub:{self.hub.path}"
        try:
            import datasets

            rows: list[dict[str, Any]] = []
            for config in self.hub.configs:
                ds = datasets.load_dataset(self.hub.path, config, split=self.hub.splits[split],
                                           revision=self.hub.revision)
                rows.extend(self.hub_row(dict(r), split, i) for i, r in enumerate(ds))
        except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear line
            failed = (f"could not load task {self.name!r} from the hub ({self.hub.path}): {type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}; offline, give a local data folder ")
            layout = f"(layout: <dir>/{self.name}/{{train,test}}.jsonl)"
            raise MetatunerError(f"{failed}(data_dir, or {DATA_DIR_ENV}) {layout}",
                                 cli=f"{failed}with --data-dir or {DATA_DIR_ENV} {layout}") from None
        return rows, where

    def hub_row(self, row: dict[str, Any], split: str, index: int) -> dict[str, Any]:
        """Maps a hub row to the local JSONL layout (override when field names differ); rows without an
        id get ``<task>-<split>-<index>``, as in the local files."""
        row.setdefault("id", f"{self.name}-{split}-{index}")
        return row


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Reads a JSON Lines file (UTF-8); errors name the file and the 1-based line number."""
    return [row for _, row in numbered_jsonl(path)]


def numbered_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """The objects of a JSON Lines file with their 1-based line numbers (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise MetatunerError(f"data file not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MetatunerError(f"cannot read {path}: {e.strerror or e}") from None
    rows = []
    for n, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise MetatunerError(f"{path}:{n}: not UTF-8 text (byte {e.start + 1} of the line is {raw[e.start]:#04x})") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise MetatunerError(f"{path}:{n}: malformed JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise MetatunerError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append((n, row))
    return rows


# a task not registered yet may be in a module $METATUNER_PLUGINS names (metatuner.plugins)
TASKS: Registry[type[Task]] = Registry("task", discover=lambda: plugins.load(builtin=False))
