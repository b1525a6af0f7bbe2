"""A small name -> object registry, used for tasks and methods.

``discover`` (optional) is called before a name is looked up that is not registered yet, and before the names
are listed: the registries of tasks and methods import the modules ``$METATUNER_PLUGINS`` names there
(:mod:`metatuner.plugins`), so a task or method defined in a user's module registers itself on first use.

>>> TASKS = Registry("task")
>>> @TASKS.register("toy")
... class Toy: ...
>>> TASKS.get("toy") is Toy
True
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from metatuner.errors import MetatunerError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, discover: Callable[[], None] | None = None):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._discover = discover

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        if name not in self._items and self._discover is not None:
            self._discover()
        try:
            return self._items[name]
        except KeyError:
            raise MetatunerError(
                f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        if self._discover is not None:
            self._discover()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        if name not in self._items and self._discover is not None:
            self._discover()
        return name in self._items
