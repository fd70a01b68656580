"""Name -> factory tables for backbones, heads and regularizers (timm-style registries).

Each table fills itself on first use by importing the package whose modules register the built-in names, so a
lookup never depends on which faceforge module happened to be imported first.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable, TypeVar

from faceforge.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])


class Registry:
    """Maps a public name to the callable that builds it; unknown names raise ConfigError listing the known ones.

    `home` is the package that registers the built-in entries when imported; it is imported before any lookup.
    """

    def __init__(self, kind: str, home: str) -> None:
        self.kind = kind
        self.home = home
        self._table: dict[str, Callable[..., Any]] = {}

    def register(self, name: str | None = None) -> Callable[[F], F]:
        """Decorator adding `factory` under `name` (default: its __name__); a name registered twice is an error."""
        def add(factory: F) -> F:
            key = name or factory.__name__
            if key in self._table:
                raise ValueError(f"{self.kind} {key!r} registered twice")
            self._table[key] = factory
            return factory

        return add

    @contextmanager
    def temporary(self, name: str, factory: Callable[..., Any]) -> Iterator[None]:
        """`factory` registered as `name` inside the block only (tests and experiments that must not leak)."""
        self.register(name)(factory)
        try:
            yield
        finally:
            del self._table[name]

    def _table_filled(self) -> dict[str, Callable[..., Any]]:
        importlib.import_module(self.home)  # a no-op once imported; while importing, registers the built-ins
        return self._table

    def get(self, name: str) -> Callable[..., Any]:
        table = self._table_filled()
        if name not in table:
            raise ConfigError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(table))}")
        return table[name]

    def build(self, name: str, **kwargs: Any) -> Any:
        """The registered factory called with `kwargs`; unknown names or keywords raise ConfigError."""
        factory = self.get(name)
        try:
            inspect.signature(factory).bind(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"{self.kind} {name!r}: {exc}") from None
        return factory(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._table_filled())

    def __contains__(self, name: str) -> bool:
        return name in self._table_filled()


BACKBONES = Registry("backbone", "faceforge.backbones")
HEADS = Registry("head", "faceforge.heads")
REGULARIZERS = Registry("regularizer", "faceforge.regularizers")
