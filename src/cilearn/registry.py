"""Decorator registries: one per component kind, one factory (``Registry.get``)."""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to components. ``@REG.register("name")`` adds one, ``REG.get(name)`` looks it up."""

    def __init__(self, kind: str, hint: str = ""):
        self.kind, self.hint = kind, hint      # hint: appended to the unknown-name error (e.g. --plugin)
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._items[name] = obj
            return obj
        return deco

    def unregister(self, name: str) -> T:
        """Removes ``name`` and returns what it named (a test's temporary recipe or component)."""
        return self._items.pop(name)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} '{name}'; expected one of: {', '.join(self.names())}"
                + (f"; {self.hint}" if self.hint else "")) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
