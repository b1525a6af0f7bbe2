"""Typed configuration: nested dataclasses, YAML files that hold overrides, and ``key=value`` overrides.

Every field has a default and a help string (``metatuner config`` prints them all). A YAML file and
the command line only override what they name; unknown keys and values of the wrong type or outside
the allowed choices are rejected with a message naming what is allowed. The resolved config is
saved with every run (``config.yaml`` in the run folder).

>>> cfg = load_config(None, ["eval.limit=20", "data.task=gsm8k"])
>>> cfg.eval.limit, cfg.data.task
(20, 'gsm8k')
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metatuner.errors import MetatunerError


def option(default: Any, help: str, choices: tuple | None = None, factory: Any = None) -> Any:
    """A dataclass field with a help string and, optionally, the allowed values."""
    meta = {"help": help, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: str = option("smollm2-135m", "downstream model M: built-in alias, Hugging Face id or local folder")
    dtype: str = option("float32", "weights dtype", ("float32", "bfloat16", "float16"))
    device: str = option("auto", "torch device ('auto' picks cuda when available, else cpu)")


@dataclass
class DataConfig:
    task: str = option("arithmetic", "task name (see `metatuner tasks`)")
    data_dir: str | None = option(
        None, "folder holding <task>/{train,test}.jsonl; unset: $METATUNER_DATA_DIR, then the hub"
    )
    train_limit: int | None = option(None, "use at most this many training items (seeded subset)")
    val_size: int = option(0, "items carved from train (seeded) for validation; never taken from test")
    seed: int = option(0, "seed of the train/validation subset choice")

    def __post_init__(self):
        _at_least("data.train_limit", self.train_limit, 1)
        _at_least("data.val_size", self.val_size, 0)


@dataclass
class EvalConfig:
    limit: int | None = option(None, "evaluate at most this many test items (seeded subset)")
    subset: str = option("first", "which items --limit keeps", ("first", "random"))
    seed: int = option(0, "seed of the random subset")
    batch_size: int = option(16, "generation batch size")
    max_new_tokens: int | None = option(None, "override the task's new-token budget")
    likelihood: bool = option(True, "also score multiple-choice tasks by option likelihood")

    def __post_init__(self):
        _at_least("eval.limit", self.limit, 1)
        _at_least("eval.batch_size", self.batch_size, 1)
        _at_least("eval.max_new_tokens", self.max_new_tokens, 1)


@dataclass
class RunConfig:
    """The root config. Sections are added here as the system grows (see configs/ for examples)."""

    method: str = option("zero-shot", "method to fit and evaluate (see `metatuner methods`)")
    model: ModelConfig = option(None, "the downstream model", factory=ModelConfig)
    data: DataConfig = option(None, "task data", factory=DataConfig)
    eval: EvalConfig = option(None, "evaluation", factory=EvalConfig)
    out_dir: str = option("runs", "parent folder of run folders")
    seed: int = option(0, "global seed (torch, python, numpy)")


def _at_least(name: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise MetatunerError(f"{name} must be >= {low}, got {value}")


# ---- building configs from dicts ---------------------------------------------------------------
def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Builds dataclass ``cls`` from a (possibly partial) nested dict, checking names, types and choices."""
    if not isinstance(data, dict):
        raise MetatunerError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise MetatunerError(
            f"unknown config key '{prefix}{unknown[0]}'; allowed: {', '.join(prefix + n for n in fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        f, hint, key = fields[name], hints[name], prefix + name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value or {}, key + ".")
        else:
            kwargs[name] = _coerce(key, value, hint, f.metadata.get("choices"))
    return cls(**kwargs)


def _coerce(key: str, value: Any, hint: Any, choices: tuple | None) -> Any:
    args = typing.get_args(hint)
    optional = type(None) in args and (typing.get_origin(hint) in (typing.Union, types.UnionType))
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    if value is None or (optional and value in ("none", "null", "None")):
        if optional:
            return None
        raise MetatunerError(f"{key} may not be empty")
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool),
    }.get(base)
    if typing.get_origin(base) is list:
        if not isinstance(value, list):
            raise MetatunerError(f"{key} must be a list, got {value!r}")
        return [str(v) for v in value]
    if ok is None or not ok(value):
        raise MetatunerError(f"{key} must be {getattr(base, '__name__', base)}, got {value!r}")
    value = base(value)
    if choices and value not in choices:
        raise MetatunerError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turns ``["a.b=1", "c=x"]`` into a nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise MetatunerError(f"override {item!r} is not of the form key=value (e.g. eval.limit=20)")
        key, raw = item.split("=", 1)
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw) if raw.strip() else None
    return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``over`` wins."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None, overrides: list[str] = (), cls: type = RunConfig) -> Any:
    """Defaults, then the YAML file (if any), then the ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise MetatunerError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise MetatunerError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
    data = merge(data, parse_overrides(list(overrides)))
    return from_dict(cls, data)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every leaf field, for ``metatuner config``."""
    rows = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            rows += describe(hint, prefix + f.name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            help_ += f" (one of: {', '.join(map(str, f.metadata['choices']))})"
        rows.append((prefix + f.name, repr(default), help_))
    return rows
