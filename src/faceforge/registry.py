"""Name -> factory tables for backbones, heads, regularizers and datasets (timm-style registries)."""

from __future__ import annotations

import inspect
from typing import Any, Callable, TypeVar

from faceforge.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])


class Registry:
    """Maps a public name to the callable that builds it; unknown names raise ConfigError listing the known ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._table: dict[str, Callable[..., Any]] = {}

    def register(self, name: str | None = None) -> Callable[[F], F]:
        def add(factory: F) -> F:
            key = name or factory.__name__
            if key in self._table:
                raise ValueError(f"{self.kind} {key!r} registered twice")
            self._table[key] = factory
            return factory

        return add

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._table:
            raise ConfigError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._table))}")
        return self._table[name]

    def build(self, name: str, **kwargs: Any) -> Any:
        factory = self.get(name)
        try:
            inspect.signature(factory).bind(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"{self.kind} {name!r}: {exc}") from None
        return factory(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._table)

    def __contains__(self, name: str) -> bool:
        return name in self._table


BACKBONES = Registry("backbone")
HEADS = Registry("head")
REGULARIZERS = Registry("regularizer")
DATASETS = Registry("dataset")
