"""Decorator registries: one per component kind, one factory (``Registry.get``). Besides its
registered names a registry may hold families of names (``register_family``): every
``PREFIX<anything>``, built on first use (``timm:NAME``, any model timm knows)."""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to components. ``@REG.register("name")`` adds one, ``REG.get(name)`` looks it up."""

    def __init__(self, kind: str, hint: str = ""):
        self.kind, self.hint = kind, hint      # hint: appended to the unknown-name error (e.g. --plugin)
        self._items: dict[str, T] = {}
        self._families: dict[str, tuple[Callable[[str], T], str]] = {}   # prefix -> (make, placeholder)
        self._made: dict[str, T] = {}                                     # family members built so far

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._items[name] = obj
            return obj
        return deco

    def register_family(self, prefix: str, make: Callable[[str], T], placeholder: str = "NAME") -> None:
        """Every name ``PREFIX<rest>`` (``rest`` not empty): ``get`` returns ``make(rest)``, built once
        per name; ``names`` lists the family as ``PREFIX<placeholder>``."""
        if prefix in self._families:
            raise ValueError(f"{self.kind} family '{prefix}' registered twice")
        self._families[prefix] = (make, placeholder)

    def _family(self, name: str) -> tuple[str, Callable[[str], T]] | None:
        for prefix, (make, _) in self._families.items():
            if name.startswith(prefix) and len(name) > len(prefix):
                return prefix, make
        return None

    def unregister(self, name: str) -> T:
        """Removes ``name`` and returns what it named (a test's temporary recipe or component)."""
        return self._items.pop(name)

    def get(self, name: str) -> T:
        if name not in self._items and (fam := self._family(name)) is not None:
            if name not in self._made:
                self._made[name] = fam[1](name[len(fam[0]):])
            return self._made[name]
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} '{name}'; expected one of: {', '.join(self.names())}"
                + (f"; {self.hint}" if self.hint else "")) from None

    def names(self) -> list[str]:
        """The registered names, then each family as ``PREFIX<placeholder>``."""
        return sorted(self._items) + [p + ph for p, (_, ph) in sorted(self._families.items())]

    def __contains__(self, name: str) -> bool:
        return name in self._items or self._family(name) is not None
