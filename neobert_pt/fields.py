"""The one helper every config section uses to declare a documented option.

A leaf module (stdlib only), like ``neobert_pt/errors.py``: the config schema, the optimizer config classes and an
optimizer's own module all import it without importing each other.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def option(default: Any, help: str) -> Any:  # noqa: A002 - "help" reads best at call sites
    """A dataclass field with a default and a one-line doc (used by --help and docs/configuration.md).

    Mutable defaults (lists, dicts, dataclass instances) are wrapped in a default_factory automatically.
    """
    metadata = {"help": help}
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return dataclasses.field(default_factory=default, metadata=metadata)
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        import copy

        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)
