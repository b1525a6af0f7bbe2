"""A task defined by a spec file, no code: ``--task file:spec.yaml`` (or ``data.task=file:spec.yaml``).

A spec names the data (JSONL, CSV or Parquet files per split, relative to the spec file, or a hub dataset
id with its splits), the template that turns a row's fields into the query, the answer field (and an
optional target field holding worked solutions), the initial instruction p~, the new-token budget and the
metric (``metatuner.tasks.metrics``). Everything else (batching, training, scoring, serving) treats it like
a built-in task. ``examples/capitals.yaml`` is a complete one::

    name: capitals
    data: {train: capitals/train.jsonl, test: capitals/test.jsonl}
    template: "What is the capital of {country}?"
    answer: capital
    instruction: "Answer with the name of the city only, in the form 'The answer is X.'"
    max_new_tokens: 16
    metric: exact

Errors name the file, the line and the field: a spec's ``spec.yaml:7: metric.name ...``, a data row's
``train.jsonl:12: row lacks field(s) country ...`` (for Parquet files the line is the row number).

The same fields given in Python, with the rows as lists of dicts and the metric possibly a Python function,
make the same kind of task (``metatuner.make_task``: ``SpecTask(spec=..., rows=..., grader=...)``); its errors
name the split and the row (``capitals[train]:3: ...``).
"""

from __future__ import annotations

import csv
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from metatuner.config import ConfigKeyError, from_dict, option
from metatuner.errors import MetatunerError
from metatuner.tasks.base import SPLITS, Example, HubSource, Task, numbered_jsonl
from metatuner.tasks.cosmosqa import list_options
from metatuner.tasks.metrics import NAMES, Metric, get_metric

TABLE_FORMATS = (".jsonl", ".csv", ".parquet")
MAX_LETTERS = 10  # letters an answer may name when one field holds each row's list of options


@dataclass
class SpecData:
    train: str | None = option(None, "the train split: a .jsonl, .csv or .parquet file, relative to the spec file")
    test: str | None = option(None, "the test split: a .jsonl, .csv or .parquet file, relative to the spec file")
    hub: str | None = option(None, "a Hugging Face dataset id, instead of files")
    hub_config: str | None = option(None, "the hub dataset's config (subset) name")
    train_split: str = option("train", "the hub split used as train")
    test_split: str = option("test", "the hub split used as test")
    revision: str | None = option(None, "a git revision of the hub dataset")
    id_field: str = option("id", "the field holding a row's id; rows without one get <name>-<split>-<line>")


@dataclass
class SpecMetric:
    name: str = option("exact", f"how answers are extracted and scored: {', '.join(NAMES)}")
    pattern: str | None = option(None, "metric regex: the answer is the first group of the pattern's last match")
    primary: str | None = option(None, "metric module:function: the score reported first (default: score)")


@dataclass
class TaskSpec:
    name: str | None = option(None, "the task's name in reports (default: the spec file's name)")
    version: str = option("1", "the task's version, recorded with results")
    data: SpecData = option(None, "where the rows are", factory=SpecData)
    template: str = option("{question}", "the query, from a row's fields in Python format syntax, e.g. 'Q: {question}'")
    answer: str = option("answer", "the field holding the gold answer")
    target: str | None = option(
        None, "the field holding the fine-tuning target (a worked solution); unset: the answer in the metric's format"
    )
    options: list[str] | None = option(
        None, "metric letter: the fields holding options A, B, ..., or one field holding a list; listed after the query"
    )
    instruction: str | None = option(None, "the initial instruction p~ (unset: the metric's default)")
    cot_instruction: str | None = option(None, "the chain-of-thought instruction (unset: 'Let's think step by step.' + p~)")
    max_new_tokens: int = option(64, "the answer's new-token budget")
    cot_max_new_tokens: int = option(256, "the new-token budget with the chain-of-thought instruction")
    stop: list[str] = option(None, "generation stops at the first of these strings", factory=list)
    metric: SpecMetric = option(None, "the metric (a name, or a mapping with name and pattern)", factory=SpecMetric)


def _key_lines(node: yaml.Node, prefix: str = "") -> dict[str, int]:
    """``{dotted key: 1-based line}`` of every key in a composed YAML mapping."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            name = f"{prefix}{key.value}"
            lines[name] = key.start_mark.line + 1
            lines.update(_key_lines(value, name + "."))
    return lines


def load_spec(path: Path) -> tuple[TaskSpec, dict[str, int]]:
    """Reads and checks a spec file; returns it with the line of each key (for error messages)."""
    if not path.is_file():
        raise MetatunerError(f"task spec file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        node, data = yaml.compose(text), yaml.safe_load(text)
    except yaml.YAMLError as e:
        # an unclosed quote or bracket is reported at the end of the file; its opening is the useful line
        scanning = str(getattr(e, "context", "") or "").startswith("while scanning")
        mark = getattr(e, "context_mark" if scanning else "problem_mark", None)
        raise MetatunerError(f"{path}:{mark.line + 1 if mark else 1}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise MetatunerError(f"{path}:1: a task spec is a mapping of fields (template, answer, data, metric, ...)")
    lines = _key_lines(node)
    if isinstance(data.get("metric"), str):
        data["metric"] = {"name": data["metric"]}
    try:
        return from_dict(TaskSpec, data), lines
    except ConfigKeyError as e:
        raise MetatunerError(f"{path}:{_line(lines, e.key)}: {e}") from None


def _line(lines: dict[str, int], key: str) -> int:
    """The line of ``key``, else of its closest written parent, else 1."""
    while key and key not in lines:
        key = key.rpartition(".")[0]
    return lines.get(key, 1)


def read_table(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """The rows of a JSONL, CSV or Parquet file with their line numbers (Parquet: row numbers)."""
    if not path.is_file():
        raise MetatunerError(f"data file not found: {path}")
    if path.suffix == ".jsonl":
        return numbered_jsonl(path)
    if path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            return [(reader.line_num, dict(row)) for row in reader]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(enumerate(pq.read_table(path).to_pylist(), 1))
    raise MetatunerError(f"{path}: unknown data format {path.suffix!r}; allowed: {', '.join(TABLE_FORMATS)}")


class SpecTask(Task):
    """A task read from a spec file (see the module docstring), or one whose spec and rows are given in Python
    (``spec``, ``rows``: split -> row dicts; what :func:`metatuner.make_task` builds). ``grader`` replaces the
    spec's named metric (a metric made from a Python function, :func:`~metatuner.tasks.metrics.function_metric`).
    """

    def __init__(self, path: str | Path | None = None, data_dir=None, *, spec: TaskSpec | None = None,
                 rows: dict[str, list[dict[str, Any]]] | None = None, grader: Metric | None = None):
        super().__init__(data_dir)  # the spec names its own data: the data folder is not used
        self.path = Path(path) if path is not None else None
        self.rows = rows
        lines: dict[str, int] = {}
        if spec is None:
            spec, lines = load_spec(self.path)
        self.spec = spec
        self.name = spec.name or self.path.stem
        #: what errors name: the spec file, or the task given in Python
        self.source = str(self.path) if self.path is not None else f"task {self.name!r}"

        def fail(key: str, message: str) -> MetatunerError:
            if self.path is None:
                return MetatunerError(f"{self.source}: {message}")
            return MetatunerError(f"{self.path}:{_line(lines, key)}: {message}")

        try:
            self.grader = grader or get_metric(spec.metric.name, spec.metric.pattern, spec.metric.primary)
        except MetatunerError as e:
            raise fail("metric", str(e)) from None
        try:
            self.template_fields = tuple(dict.fromkeys(
                name.split(".")[0].split("[")[0] for _, name, _, _ in string.Formatter().parse(spec.template) if name
            ))
        except ValueError as e:
            raise fail("template", f"template {spec.template!r} is not a format string ({e})") from None
        if not self.template_fields:
            raise fail("template", f"template {spec.template!r} names no field; write fields as {{question}}")
        self.option_fields = tuple(spec.options or ())
        if (spec.metric.name == "letter") != bool(self.option_fields):
            raise fail("options" if spec.options else "metric", "options (the fields holding the choices) go with metric letter, and only with it")
        instruction = spec.instruction or self.grader.instruction
        if instruction is None:
            raise fail("instruction", f"metric {spec.metric.name} has no default instruction; set instruction (p~)")
        if rows is not None and not rows:
            raise fail("data", "no rows given; give train and/or test rows")
        if rows is None and spec.data.hub and (spec.data.train or spec.data.test):
            raise fail("data", "data names both a hub dataset and files; give one of them")
        if rows is None and not (spec.data.hub or spec.data.train or spec.data.test):
            raise fail("data", "data names no rows; give data.train / data.test files or data.hub")
        for key in ("max_new_tokens", "cot_max_new_tokens"):
            if getattr(spec, key) < 1:
                raise fail(key, f"{key} must be >= 1, got {getattr(spec, key)}")

        self.version = spec.version
        self.instruction = instruction
        self.cot_instruction = spec.cot_instruction or f"Let's think step by step. {instruction}"
        self.max_new_tokens, self.cot_max_new_tokens = spec.max_new_tokens, spec.cot_max_new_tokens
        self.stop = tuple(spec.stop)
        self.template, self.answer_field, self.metric = spec.template, spec.answer, spec.metric.name
        self.query_fields = self.template_fields + self.option_fields
        self.required_fields = (*self.query_fields, spec.answer, *((spec.target,) if spec.target else ()))
        self.primary_metric = self.grader.primary
        self.letters = tuple(string.ascii_uppercase[: len(self.option_fields) if len(self.option_fields) > 1 else MAX_LETTERS])
        self.hub = HubSource(spec.data.hub, (spec.data.hub_config,), {"train": spec.data.train_split,
                             "test": spec.data.test_split}, spec.data.revision) if spec.data.hub else None

    def card(self) -> dict[str, Any]:
        if self.rows is not None:
            data = {k: f"{len(v)} rows given in Python" for k, v in self.rows.items()}
        else:
            data = {"hub": self.hub.path} if self.hub else {k: str(self.path.parent / f) for k in SPLITS
                                                             if (f := getattr(self.spec.data, k))}
        return {**super().card(), "data": data} | ({"options": list(self.option_fields)} if self.option_fields else {})

    # ---- rows -> examples ----------------------------------------------------------------------
    def load(self, split: str) -> list[Example]:
        if split not in SPLITS:
            raise MetatunerError(f"unknown split {split!r}; available: {', '.join(SPLITS)}")
        if self.rows is not None:
            if split not in self.rows:
                raise MetatunerError(f"task {self.name!r} has no {split} split; give its {split} rows")
            numbered, where = list(enumerate(self.rows[split], 1)), f"{self.name}[{split}]"
        elif self.hub is not None:
            rows, where = self._load_hub(split)
            numbered = list(enumerate(rows, 1))
        else:
            file = getattr(self.spec.data, split)
            if file is None:
                raise MetatunerError(f"{self.path}: task {self.name!r} has no {split} split; set data.{split}")
            path = self.path.parent / file
            numbered, where = read_table(path), str(path)
        id_field = self.spec.data.id_field
        examples = [
            self.checked_example({**row, "id": row.get(id_field, f"{self.name}-{split}-{n}")}, where, n)
            for n, row in numbered
        ]
        if not examples:
            raise MetatunerError(f"{where}: the {split} split of task {self.name!r} is empty")
        return examples

    def checked_example(self, row: dict[str, Any], where: str, line: int) -> Example:
        missing = [f for f in self.required_fields if f not in row]
        if missing:
            raise MetatunerError(
                f"{where}:{line}: row lacks field(s) {', '.join(missing)} named by {self.source} "
                f"(its fields: {', '.join(self.required_fields)})"
            )
        return self._example(row, where, line, labelled=True)

    def example_from_row(self, row: dict[str, Any]) -> Example:
        return self._example(row, self.source, 0, labelled=True)

    def unlabelled_example(self, row: dict[str, Any]) -> Example:
        return self._example(row, self.source, 0, labelled=False)

    def _example(self, row: dict[str, Any], where: str, line: int, labelled: bool) -> Example:
        try:
            query = self.spec.template.format_map(row)
        except (KeyError, IndexError, ValueError, AttributeError) as e:
            raise MetatunerError(f"{where}:{line}: template {self.spec.template!r} fails on this row ({e!r})") from None
        options: tuple[str, ...] = ()
        if self.option_fields:
            listed = row[self.option_fields[0]] if len(self.option_fields) == 1 else None
            options = tuple(map(str, listed if isinstance(listed, list) else [row[f] for f in self.option_fields]))
            if not 2 <= len(options) <= len(self.letters):
                raise MetatunerError(f"{where}:{line}: field {self.option_fields[0]!r} holds {len(options)} options; "
                                     f"allowed: 2 to {len(self.letters)}")
            query = f"{query}\nOptions:\n{list_options(options, self.letters)}"
        example = Example(id=str(row["id"]), query=query, answer="", target="", options=options)
        if not labelled:
            return example
        answer, meta = str(row[self.spec.answer]).strip(), {}
        if options:
            label = self._label(row[self.spec.answer], options)
            if label is None:
                raise MetatunerError(
                    f"{where}:{line}: field {self.spec.answer!r} = {row[self.spec.answer]!r} names no option; "
                    f"give a letter ({', '.join(self.letters[: len(options)])}), a 0-based index or an option's text"
                )
            answer, meta = self.letters[label], {"label": label}
        target = str(row[self.spec.target]) if self.spec.target else self.grader.target_format.format(answer=answer)
        return Example(id=example.id, query=query, answer=answer, target=target, options=options, meta=meta)

    def _label(self, value: Any, options: tuple[str, ...]) -> int | None:
        """The 0-based option an answer names: a letter, an index, or the option's text."""
        text = str(value).strip()
        if text in self.letters[: len(options)]:
            return self.letters.index(text)
        if text.isdigit() and int(text) < len(options):
            return int(text)
        return options.index(text) if text in options else None

    # ---- grading -------------------------------------------------------------------------------
    def extract(self, output: str) -> dict[str, str | None]:
        return self.grader.extract(output, self.letters)

    def score(self, extracted: dict[str, str | None], example: Example) -> dict[str, float]:
        return self.grader.score(extracted, example, self.letters)

    def choices(self, example: Example) -> list[str] | None:
        return list(example.options) if example.options else None
