"""Head wrappers: a key of the head table that wraps the head it configures, e.g.
`head: {name: arcface, s: 64, m: 0.5, unpg: {k: 1.5}}` builds ArcFace and wraps it in UNPG(base, k=1.5).

A wrapper registers itself under its key (`@register_wrapper("unpg")`) as a callable `(base, **table) -> Head`;
build_head applies every registered key it finds, so no key is special-cased anywhere else.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from faceforge.errors import ConfigError
from faceforge.heads.base import Head

W = TypeVar("W", bound=Callable[..., Head])

WRAPPERS: dict[str, Callable[..., Head]] = {}


def register_wrapper(key: str) -> Callable[[W], W]:
    """Register a wrapper under the head-table key `key`."""

    def add(factory: W) -> W:
        if key in WRAPPERS:
            raise ValueError(f"head wrapper {key!r} registered twice")
        WRAPPERS[key] = factory
        return factory

    return add


def check_wrapper_table(key: str, table: object) -> dict[str, Any]:
    """The `head.<key>` table as keyword arguments of its wrapper; an unknown key, or a non-number where the
    wrapper's default is a number, raises ConfigError naming `head.<key>.<name>`."""
    if not isinstance(table, dict):
        raise ConfigError(f"head.{key} must be a mapping such as {{k: 1.5}}, got {table!r}")
    params = dict(inspect.signature(WRAPPERS[key]).parameters)
    params.pop(next(iter(params)))  # the wrapped head
    for name, value in table.items():
        if name not in params:
            raise ConfigError(f"head.{key}.{name}: unknown key; known: {', '.join(params)}")
        default = params[name].default
        numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
        if numeric and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"head.{key}.{name} must be a number, got {value!r}")
    return dict(table)


def split_wrappers(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(the head's own parameters, {wrapper key: its checked table}) of a head table without its name."""
    own = {k: v for k, v in params.items() if k not in WRAPPERS}
    return own, {k: check_wrapper_table(k, v) for k, v in params.items() if k in WRAPPERS}


def wrap(head: Head, wrappers: dict[str, dict[str, Any]]) -> Head:
    """`head` wrapped by each wrapper in turn (the table's order)."""
    for key, table in wrappers.items():
        head = WRAPPERS[key](head, **table)
    return head
