"""Fair tuning: each method's learning rate chosen on validation, at a short budget, before the grid's cells.

A protocol's optional ``tune`` section names, per method, one config key and the values to try, plus the
overrides every tuning run shares (a short budget, and optionally a larger validation carve)::

    tune:
      seed: 0                                  # the training seed of the tuning runs
      overrides: {train.steps: 6, dpo.steps: 6}
      methods:
        sft: {train.lr_scale: [0.3, 1.0, 3.0]}
        dpo: {dpo.lr: [3.0e-4, 1.0e-3, 3.0e-3]}

For each (task, method) every value is one fit of the method (the cell's config, then ``overrides``, then
the value) on the train split, scored on the validation items carved from train (``data.val_size``,
seeded): test items are never read. The value with the best mean primary metric is chosen (ties go to
the value the method's own config already has, else to the first listed) and the cells of that task and
method run with it. Each choice is written, with every value's validation score and fit seconds, to
``tuning/<task>--<method>.json`` in the grid folder, once: a rerun reuses it, and the report shows it.
The tuning runs' seconds are part of what the method cost: the report's cost table shows them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metatuner import files
from metatuner.errors import MetatunerError


@dataclass
class Tuning:
    methods: dict[str, tuple[str, list[Any]]]  # method -> (config key, values)
    overrides: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    @classmethod
    def parse(cls, data: Any, where: Path) -> "Tuning | None":
        if data is None:
            return None
        if not isinstance(data, dict) or not set(data) <= {"seed", "overrides", "methods"}:
            raise MetatunerError(f"{where}: protocol key 'tune' must be a mapping with 'methods' and optionally "
                                 f"'overrides' and 'seed', got {data!r:.120}")
        methods = {}
        for method, spec in (data.get("methods") or {}).items():
            if not isinstance(spec, dict) or len(spec) != 1:
                raise MetatunerError(f"{where}: tune.methods.{method} must name one config key and its values, "
                                     f"e.g. {{train.lr_scale: [0.3, 1.0, 3.0]}}, got {spec!r:.120}")
            (key, values), = spec.items()
            if not isinstance(values, list) or len(values) < 2:
                raise MetatunerError(f"{where}: tune.methods.{method}.{key} needs a list of at least 2 values to "
                                     f"choose from, got {values!r:.80}")
            methods[str(method)] = (str(key), list(values))
        if not methods:
            raise MetatunerError(f"{where}: protocol key 'tune' names no method under 'methods'")
        overrides = data.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise MetatunerError(f"{where}: tune.overrides must be a mapping of config keys, got {overrides!r:.80}")
        seed = data.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise MetatunerError(f"{where}: tune.seed must be an integer, got {seed!r}")
        return cls(methods, dict(overrides), seed)

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "overrides": self.overrides,
                "methods": {m: {k: v} for m, (k, v) in self.methods.items()}}


def choice_path(out: Path, task_file: str, method: str) -> Path:
    return out / "tuning" / f"{task_file}--{method}.json"


def chosen(out: Path, task_file: str, method: str) -> dict[str, Any]:
    """The tuned ``{key: value}`` of a (task, method), or {} when it was not tuned."""
    path = choice_path(out, task_file, method)
    if not path.is_file():
        return {}
    record = files.read_json(path)
    return {record["key"]: record["chosen"]}


def current(cfg, key: str) -> Any:
    """The value of config key ``key`` (``train.lr_scale``) in ``cfg``."""
    node = cfg
    for part in key.split("."):
        node = getattr(node, part, None)
    return node


def pick(scores: list[float], values: list[Any], current: Any) -> int:
    """The index of the best score; ties go to ``current`` (the config's own value) if it is among them,
    else to the first listed."""
    best = max(scores)
    tied = [i for i, s in enumerate(scores) if s == best]
    return next((i for i in tied if values[i] == current), tied[0])


def records(out: Path) -> list[dict[str, Any]]:
    """Every tuning choice on file in grid folder ``out``."""
    folder = out / "tuning"
    return [files.read_json(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def tuning_seconds(out: Path) -> dict[str, float]:
    """Method -> seconds of its tuning runs, per task (mean over tasks)."""
    per: dict[str, list[float]] = {}
    for r in records(out):
        per.setdefault(r["method"], []).append(r["seconds"])
    return {m: sum(v) / len(v) for m, v in per.items()}


def tuning_table(out: Path) -> str:
    """The report's section on the tuning: per (task, method), each value's validation score and the choice."""
    done = records(out)
    if not done:
        return ""
    lines = ["Tuning (each value one fit at the tuning budget, scored on validation items carved from train; "
             "test never read):", "", "| task | method | key | validation score per value (%) | chosen | seconds |",
             "|---|---|---|---|---|---|"]
    for r in done:
        tried = ", ".join(f"{t['value']}: {100 * t['val_score']:.1f}" for t in r["tried"])
        lines.append(f"| {r['task']} | {r['method']} | {r['key']} | {tried} (n={r['tried'][0]['n']}) | "
                     f"{r['chosen']} | {r['seconds']:.0f} |")
    return "\n".join(lines)
