"""User errors before any work: every component table of a config (backbone, head with its UNPG table, each
regularizer) is built once on the `meta` device, where constructors run their own keyword and value checks
without allocating memory, before the trainer opens (or generates) any data."""

from __future__ import annotations

import inspect
import re
from typing import Any, Callable

import torch

from faceforge.backbones import build_backbone
from faceforge.config import Config
from faceforge.errors import ConfigError
from faceforge.heads import build_head
from faceforge.registry import HEADS, REGULARIZERS

# Class count a head is built with before the data is open, when `head.num_classes` does not say: large enough
# for every head's class-count-dependent setting (SphereFace2's bias needs N > 2). The data decides the real count
# later. A head whose `num_classes` defaults to None (GIF) takes its count from its own inputs and gets None.
STAND_IN_CLASSES = 1000
_REPORTS_ITSELF = ("backbone", "head", "regularizer", "unknown ")  # the registries' errors name the table already


def _as_config_error(where: str, table: dict[str, Any], exc: Exception) -> ConfigError:
    """`exc` as one line naming the table, and the key when the message names one (`head.m=4.0: ...`)."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    if message.startswith((where, *_REPORTS_ITSELF)):
        return ConfigError(message)
    named = [key for key in table if key != "name" and re.search(rf"(?<![\w.']){re.escape(key)}\b", message)]
    prefix = f"{where}.{named[0]}={table[named[0]]!r}" if named else f"{where} ({table.get('name')!r})"
    return ConfigError(f"{prefix}: {message}")


def _checked(where: str, table: dict[str, Any], build: Callable[[], Any]) -> Any:
    """`build()`; a ValueError, TypeError or ConfigError it raises comes back as a one-line ConfigError."""
    try:
        return build()
    except (ValueError, TypeError, ConfigError) as exc:
        raise _as_config_error(where, table, exc) from None


def check_components(cfg: Config) -> None:
    """Raise ConfigError (one line, naming the key) when a component table has an unknown name or keyword or a
    value its constructor refuses, or a regularizer cannot work with the head; nothing is allocated.

    Files a table names (GIF's `head.codes`) are read, so a missing one is reported here too.
    """
    params = lambda table: {k: v for k, v in table.items() if k != "name"}  # noqa: E731
    head_params = {k: v for k, v in params(cfg.head).items() if k != "num_classes"}
    counts_itself = inspect.signature(HEADS.get(cfg.head["name"])).parameters.get("num_classes")
    stand_in = None if counts_itself is not None and counts_itself.default is None else STAND_IN_CLASSES
    num_classes = cfg.head.get("num_classes", stand_in)
    with torch.device("meta"):
        backbone = _checked("backbone", cfg.backbone, lambda: build_backbone(cfg.backbone["name"], **params(cfg.backbone)))
        head = _checked("head", cfg.head, lambda: build_head(
            cfg.head["name"], backbone.embedding_size, num_classes, **head_params))
        for i, table in enumerate(cfg.regularizers):
            where = f"regularizers[{i}]"
            regularizer = _checked(where, table, lambda: REGULARIZERS.build(table["name"], **params(table)))
            _checked(where, table, lambda: regularizer.bind(head))
