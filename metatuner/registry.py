"""A small name -> object registry, used for tasks and methods.

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
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise MetatunerError(
                f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
