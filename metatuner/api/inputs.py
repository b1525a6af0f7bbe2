"""What a run is made from: its config (:func:`load_config`) and its task (:func:`load_task`, :func:`make_task`).

A task built in Python is written into the run folder it trains in, as a spec file with its rows
(``<run>/task/task.yaml``, ``train.jsonl``, ``test.jsonl``), and the run's config names that file, so the run
loads again anywhere (``load_run(dir)``, ``metatuner eval --run``). A metric that is a function is recorded
as ``module:function``; one that cannot be imported by that name (a lambda, a local function, one defined in
``__main__`` or a notebook) is recorded as ``python:<name>``, and so is the task (``data.task:
python:<name>``): loading such a run takes the task again (``load_run(dir, task=task)``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from metatuner import files
from metatuner.config import RunConfig, absolute_task_files, from_dict, load_config as _load_config, merge, to_dict
from metatuner.errors import MetatunerError
from metatuner.options import ConfigKeyError
from metatuner.tasks import SpecTask, Task, get_task
from metatuner.tasks.metrics import function_metric
from metatuner.tasks.spec import TaskSpec

#: ``data.task`` of a run whose task was built in Python and not written as a spec (nor its metric's name)
PYTHON_TASK_PREFIX = "python:"
#: the folder of a run folder that holds a task built in Python, as a spec file with its rows
TASK_FOLDER = "task"

ConfigSource = RunConfig | str | Path | None
Overrides = Mapping[str, Any] | Sequence[str] | None


# ---- configs -----------------------------------------------------------------------------------
def _nested(values: Mapping[str, Any]) -> dict[str, Any]:
    """``{"model.name": x, "train": {"steps": 2}}`` -> ``{"model": {"name": x}, "train": {"steps": 2}}``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str) or not all(key.split(".")):
            raise MetatunerError(f"config key {key!r} is not a key such as 'eval.limit'")
        *parents, leaf = key.split(".")
        node: dict[str, Any] = {}
        node[leaf] = _nested(value) if isinstance(value, Mapping) else value
        for p in reversed(parents):
            node = {p: node}
        out = merge(out, node)
    return out


def load_config(config: ConfigSource = None, overrides: Overrides = None, /, **values: Any) -> RunConfig:
    """The typed run config: defaults, then a config file, then overrides.

    Args:
        config: a YAML file of overrides, a shipped config by name (``"quick"``, ``"gsm8k"``, ...), a
            :class:`~metatuner.config.RunConfig` to start from, or None for the defaults.
        overrides: a mapping of keys to values, nested (``{"train": {"steps": 20}}``) or dotted
            (``{"train.steps": 20}``), or a list of ``"key=value"`` strings as the command line takes them.
        **values: more overrides, as keyword arguments: a section as a dict (``train={"steps": 20}``) or a
            top-level key (``seed=1``); dotted keys go through ``**{"model.name": ...}``.

    Returns:
        The resolved :class:`~metatuner.config.RunConfig`. Unknown keys and values of the wrong type or
        outside the allowed choices raise :class:`~metatuner.MetatunerError` naming what is allowed.

    Example::

        >>> cfg = load_config("quick", train={"steps": 20}, **{"eval.limit": 8})
        >>> cfg.train.steps, cfg.eval.limit
        (20, 8)
    """
    strings: list[str] = []
    nested: dict[str, Any] = {}
    if isinstance(overrides, Mapping):
        nested = _nested(overrides)
    elif overrides is not None:
        if isinstance(overrides, str):
            raise MetatunerError(f"overrides {overrides!r}: give a mapping or a list of 'key=value' strings")
        strings = list(overrides)
    nested = merge(nested, _nested(values))
    try:
        if isinstance(config, RunConfig):
            base = merge(to_dict(config), nested)
            return _load_config(None, strings, values=base) if strings else from_dict(RunConfig, base)
        return _load_config(config, strings, values=nested)
    except ConfigKeyError as e:
        raise MetatunerError(str(e)) from None


# ---- tasks -------------------------------------------------------------------------------------
def load_task(name: str | Path, data_dir: str | Path | None = None) -> Task:
    """A task by name: a built-in one (``"gsm8k"``; ``metatuner tasks`` lists them), a spec file (a path to
    a ``.yaml`` file, or ``"file:spec.yaml"``) or a cross-task mix such as ``"math+hotpotqa>gsm8k"``.

    Args:
        name: the task's name or spec file.
        data_dir: the folder holding ``<task>/{train,test}.jsonl`` for built-in tasks (unset:
            ``$METATUNER_DATA_DIR``, else the Hugging Face hub). A spec file names its own data.

    Returns:
        The :class:`~metatuner.tasks.Task`.

    Example::

        >>> load_task("examples/capitals.yaml").name
        'capitals'
    """
    return get_task(_task_name(name), None if data_dir is None else str(data_dir))


def _task_name(name: str | Path) -> str:
    """A task's name as ``data.task`` holds it: a path to a ``.yaml`` file as ``file:<absolute path>``."""
    text = str(name)
    if text.endswith((".yaml", ".yml")) and not text.startswith("file:"):
        text = "file:" + text
    return absolute_task_files(text)


def _rows(data: Any, split: str) -> list[dict[str, Any]]:
    """The rows of a list of dicts, a ``datasets.Dataset`` or a pandas ``DataFrame``."""
    if hasattr(data, "columns") and hasattr(data, "to_dict"):  # a pandas DataFrame
        data = data.to_dict(orient="records")
    elif hasattr(data, "column_names") and hasattr(data, "to_list"):  # a datasets.Dataset
        data = data.to_list()
    if isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Iterable):
        raise MetatunerError(f"{split} rows: give a list of dicts, a datasets.Dataset or a pandas DataFrame, "
                             f"not a {type(data).__name__}")
    rows = list(data)
    for i, row in enumerate(rows, 1):
        if not isinstance(row, Mapping):
            raise MetatunerError(f"{split} row {i}: a row is a mapping of field names to values, "
                                 f"got a {type(row).__name__}")
    return [dict(row) for row in rows]


def make_task(
    train: Any = None,
    test: Any = None,
    *,
    template: str = "{question}",
    answer: str = "answer",
    metric: str | Callable[[str, str], float | dict[str, float]] = "exact",
    name: str = "custom",
    instruction: str | None = None,
    target: str | None = None,
    options: list[str] | None = None,
    max_new_tokens: int = 64,
    stop: Sequence[str] = (),
    primary: str | None = None,
    pattern: str | None = None,
) -> Task:
    """A task from Python objects, graded like a spec-file task (``metatuner.tasks.spec``) with the same fields.

    Args:
        train: the training rows: a list of dicts, a ``datasets.Dataset`` or a pandas ``DataFrame``.
        test: the test rows, in the same forms (what :meth:`Run.evaluate` and evaluation after training score).
        template: the query, from a row's fields in Python format syntax (``"Q: {question}"``).
        answer: the field holding the gold answer.
        metric: a metric by name (``exact``, ``numeric``, ``f1``, ``letter``, ``math``, ``regex``) or a
            callable ``metric(output, answer) -> float`` (or a dict of floats), called with the whole model
            output and the gold answer, as a ``module:function`` metric of a spec file is.
        name: the task's name in results and run folders.
        instruction: the initial instruction p~ MetaTuner rewrites per query (unset: the metric's default;
            required with a callable metric).
        target: the field holding a worked solution to fine-tune on (unset: the answer in the metric's format).
        options: with ``metric="letter"``: the fields holding the options, or one field holding a list.
        max_new_tokens: the answer's new-token budget.
        stop: generation stops at the first of these strings.
        primary: with a callable metric returning a dict: the score reported first (default ``score``).
        pattern: with ``metric="regex"``: the pattern whose first group is the answer.

    Returns:
        The :class:`~metatuner.tasks.Task`. Rows are checked when a split is loaded; errors name the split
        and the row (``capitals[train]:3: row lacks field(s) capital ...``).

    Example::

        >>> task = make_task(train=[{"question": "2+2?", "answer": "4"}] * 4, metric="numeric")
        >>> task.load("train")[0].query
        '2+2?'
    """
    rows = {split: _rows(data, split) for split, data in (("train", train), ("test", test)) if data is not None}
    if not rows:
        raise MetatunerError(f"task {name!r}: no rows given; give train and/or test rows")
    grader = None
    metric_fields: dict[str, Any] = {"pattern": pattern, "primary": primary}
    if callable(metric):
        if pattern:
            raise MetatunerError("pattern goes with metric='regex', not with a callable metric")
        label = _function_name(metric)
        grader, metric_fields = function_metric(metric, label, primary), {"name": label, "primary": primary}
    elif isinstance(metric, str):
        metric_fields["name"] = metric
    else:
        raise MetatunerError(f"metric must be a metric's name or a callable(output, answer), not {metric!r}")
    fields = {"name": name, "template": template, "answer": answer, "target": target, "options": options,
              "instruction": instruction, "max_new_tokens": max_new_tokens, "stop": list(stop),
              "metric": {k: v for k, v in metric_fields.items() if v is not None}}
    try:
        spec = from_dict(TaskSpec, {k: v for k, v in fields.items() if v is not None})
    except ConfigKeyError as e:
        raise MetatunerError(f"task {name!r}: {e}") from None
    return SpecTask(spec=spec, rows=rows, grader=grader)


def _function_name(function: Callable) -> str:
    """``module:qualname`` of a function its module holds by that name, else ``python:<name>``."""
    module, qualname = getattr(function, "__module__", None), getattr(function, "__qualname__", "")
    if module and module != "__main__" and "<" not in qualname and "." not in qualname:
        if getattr(sys.modules.get(module), qualname, None) is function:
            return f"{module}:{qualname}"
    return PYTHON_TASK_PREFIX + getattr(function, "__name__", type(function).__name__)


def saved_task_name(task: Task | None, folder: Path) -> str | None:
    """The ``data.task`` of a task built in Python once :func:`save_task` writes it into ``folder``; None for
    any other task, and for one whose metric is a function not importable by name (see the module docstring)."""
    if not isinstance(task, SpecTask) or task.rows is None or task.spec.metric.name.startswith(PYTHON_TASK_PREFIX):
        return None
    return absolute_task_files(f"file:{folder / 'task.yaml'}")


def save_task(task: SpecTask, folder: Path) -> None:
    """Writes a task built in Python as a spec file (``task.yaml``) with a JSONL file of rows per split."""
    spec = to_dict(task.spec)
    spec["data"].update({split: f"{split}.jsonl" for split in task.rows})
    for split, rows in task.rows.items():
        files.write_text(folder / f"{split}.jsonl",
                         "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows))
    files.write_text(folder / "task.yaml", yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))


def _task_ref(task: Task) -> str:
    """What a run's ``data.task`` records for a task object: its spec file or name; a task built in Python
    is ``python:<name>`` until a run folder holds it as a spec (:func:`saved_task_name`)."""
    if isinstance(task, SpecTask):
        return f"file:{task.path.resolve()}" if task.path is not None else PYTHON_TASK_PREFIX + task.name
    return task.name


def _resolve_task(task: Task | str | Path | None, cfg: RunConfig) -> tuple[Task | None, RunConfig]:
    """The task object to use (None: the config's ``data.task``, which a name given here replaces) and the
    config recording it."""
    if task is None:
        return None, cfg
    if isinstance(task, Task):
        return task, dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, task=_task_ref(task)))
    return None, dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, task=_task_name(task)))


def _task_of(cfg: RunConfig, where: Path) -> Task:
    if cfg.data.task.startswith(PYTHON_TASK_PREFIX):
        name = cfg.data.task.removeprefix(PYTHON_TASK_PREFIX)
        raise MetatunerError(f"{where} was trained on task {name!r}, built in Python with a metric that cannot be "
                             f"imported by name; pass the task again (task=make_task(...))")
    return get_task(cfg.data.task, cfg.data.data_dir)
