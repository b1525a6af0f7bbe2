"""The pieces every config section is made of: a field with a help string, and the error for a bad value."""

from __future__ import annotations

from dataclasses import field
from typing import Any

from metatuner.errors import MetatunerError


def option(default: Any, help: str, choices: tuple | None = None, factory: Any = None) -> Any:
    """A dataclass field with a help string and, optionally, the allowed values."""
    meta = {"help": help, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


class ConfigKeyError(MetatunerError):
    """A bad config value or key; ``key`` is its dotted name, so a caller can point at where it was written."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def _at_least(name: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise ConfigKeyError(name, f"{name} must be >= {low}, got {value}")


def _require(prefix: str, obj: Any, names: tuple[str, ...], ok, what: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and not ok(value):
            raise ConfigKeyError(f"{prefix}.{name}", f"{prefix}.{name} must be {what}, got {value}")


def positive(prefix: str, obj: Any, *names: str) -> None:
    """Raises a :class:`ConfigKeyError` naming ``<prefix>.<name>`` unless each of ``obj``'s ``names`` is > 0."""
    _require(prefix, obj, names, lambda v: v > 0, "> 0")


def non_negative(prefix: str, obj: Any, *names: str) -> None:
    """Raises a :class:`ConfigKeyError` naming ``<prefix>.<name>`` unless each of ``obj``'s ``names`` is >= 0."""
    _require(prefix, obj, names, lambda v: v >= 0, ">= 0")
