"""A benchmark protocol: the tasks, seeds and methods of a grid, with the overrides of every cell.

A protocol file (``metatuner/configs/bench/cpu.yaml``) names the tasks, the seeds, the methods with
their config overrides, the overrides every cell shares (``common``) and those of one task (``per_task``),
and optionally a ``tune`` section (fair tuning of the methods' learning rates, :mod:`metatuner.bench.tuning`).
:meth:`Protocol.load` reads and checks it: every cell's config and test splits and every tuning run's config
must be valid before any work starts. A cell's config is ``common``, then ``per_task``, then the method's
overrides, then the value tuning chose for the method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metatuner.config import RunConfig, from_dict, merge, parse_overrides, read_yaml_mapping
from metatuner.errors import MetatunerError
from metatuner.tasks import get_task

SHIPPED_BENCH = Path(__file__).resolve().parent.parent / "configs" / "bench"


@dataclass
class Tuning:
    """A protocol's ``tune`` section: per method one config key and the values to try, the overrides every
    tuning run shares, and the tuning runs' training seed."""

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


@dataclass
class Protocol:
    name: str
    tasks: list[str]
    seeds: list[int]
    methods: dict[str, dict[str, Any]]
    common: dict[str, Any] = field(default_factory=dict)
    per_task: dict[str, dict[str, Any]] = field(default_factory=dict)
    tune: Tuning | None = None  # fair tuning of the methods' learning rates (:mod:`metatuner.bench.tuning`)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] = ()) -> "Protocol":
        """Reads a protocol file (or a shipped one by name); ``overrides`` are ``key=value`` on its keys,
        e.g. ``common.eval.limit=4`` or ``seeds=[0]``."""
        p = Path(path)
        if not p.is_file():
            named = SHIPPED_BENCH / f"{Path(str(path)).stem}.yaml"
            if not named.is_file():
                names = ", ".join(shipped_protocols())
                raise MetatunerError(f"protocol file not found: {p} (shipped protocols: {names})")
            p = named
        data = merge(read_yaml_mapping(p, "protocol file"), parse_overrides(list(overrides)))
        allowed = {"name", "tasks", "seeds", "methods", "common", "per_task", "tune"}
        unknown = sorted((k for k in data if k not in allowed), key=str)
        if unknown:
            raise MetatunerError(f"{p}: unknown protocol key {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
        for key in ("tasks", "seeds", "methods"):
            if not data.get(key):
                raise MetatunerError(f"{p}: protocol needs a non-empty {key!r}")
        protocol = cls(
            name=str(data.get("name", p.stem)), tasks=_strings(data["tasks"], p, "tasks"), seeds=_seeds(data["seeds"], p),
            methods=_mapping_of_mappings(data["methods"], p, "methods"), common=_mapping(data.get("common"), p, "common"),
            per_task=_mapping_of_mappings(data.get("per_task"), p, "per_task"), tune=Tuning.parse(data.get("tune"), p),
        )
        for method, (_, values) in (protocol.tune.methods.items() if protocol.tune else ()):
            if method not in protocol.methods:
                raise MetatunerError(f"{p}: tune.methods names {method!r}, which is not among the protocol's methods")
            for task in protocol.tasks:  # every tuning run's config must be valid before any work starts
                for value in values:
                    protocol.tuning_config(task, method, value)
        for cell in protocol.cells():  # every cell's config and test splits must be valid before any work starts
            cfg = protocol.config(*cell)
            task = get_task(cfg.data.task)
            for split in cfg.eval.splits:
                task.check_split(split)
        return protocol

    def cells(self, only: list[str] | None = None) -> list[tuple[str, str, int]]:
        """``(task, method, seed)`` of every cell, or of the cells of the methods in ``only``."""
        return [(t, m, s) for t in self.tasks for m in self.methods for s in self.seeds if not only or m in only]

    def config(self, task: str, method: str, seed: int, tuned: dict[str, Any] | None = None) -> RunConfig:
        """The resolved RunConfig of one cell: common, then per-task, then per-method overrides, then ``tuned``
        (the ``{key: value}`` tuning chose for the method, :func:`metatuner.bench.tuning.chosen`)."""
        return from_dict(RunConfig, self._overrides(task, method, seed, tuned))

    def _overrides(self, task: str, method: str, seed: int, tuned: dict[str, Any] | None = None) -> dict[str, Any]:
        overrides = merge(merge(nest(self.common), nest(self.per_task.get(task, {}))), nest(self.methods[method]))
        if tuned:
            overrides = merge(overrides, nest(tuned))
        overrides.setdefault("method", method)
        return merge(overrides, {"data": {"task": task, "seed": seed}, "seed": seed})

    def tuning_config(self, task: str, method: str, value: Any, data_dir: str | None = None) -> RunConfig:
        """The RunConfig of one tuning run: the cell's config at ``tune.seed``, then ``tune.overrides``,
        then ``value`` for the method's tuned key."""
        spec = self.tune
        key, _ = spec.methods[method]
        overrides = merge(merge(self._overrides(task, method, spec.seed), nest(spec.overrides)), nest({key: value}))
        if data_dir:
            overrides = merge(overrides, {"data": {"data_dir": data_dir}})
        return from_dict(RunConfig, overrides)


def _strings(value, p: Path, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise MetatunerError(f"{p}: protocol key {key!r} must be a list of names, got {value!r:.80}")
    return list(value)


def _seeds(value, p: Path) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise MetatunerError(f"{p}: protocol key 'seeds' must be a list of integers, got {value!r:.80}")
    return list(value)


def _mapping(value, p: Path, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise MetatunerError(f"{p}: protocol key {key!r} must be a mapping of names, got {value!r:.80}")
    return dict(value)


def _mapping_of_mappings(value, p: Path, key: str) -> dict[str, dict[str, Any]]:
    return {k: _mapping(v, p, f"{key}.{k}") for k, v in _mapping(value, p, key).items()}


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"train.steps": 3}`` -> ``{"train": {"steps": 3}}`` (nested dicts pass through)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = nest(value) if isinstance(value, dict) else value
    return out


def shipped_protocols() -> list[str]:
    """Names of the protocols shipped in ``metatuner/configs/bench/``."""
    return sorted(f.stem for f in SHIPPED_BENCH.glob("*.yaml"))


def to_protocol_dict(p: Protocol) -> dict[str, Any]:
    """The protocol as the mapping a protocol file holds (written to a grid folder's ``protocol.yaml``)."""
    return {"name": p.name, "tasks": p.tasks, "seeds": p.seeds, "methods": p.methods, "common": p.common,
            "per_task": p.per_task, **({"tune": p.tune.to_dict()} if p.tune else {})}
