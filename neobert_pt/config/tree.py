"""Introspection of the config dataclass tree: every dotted key with its type, default and doc.

The loader, ``pretrain.py --help``, ``docs/configuration.md`` and the key snapshot test all read the schema through
this one module, so a field added to any section is overridable, documented and snapshotted without extra code.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal, Union


@dataclass(frozen=True)
class Option:
    """One field of the tree. ``is_section`` marks a nested dataclass (``optimizer.dion2_config``)."""

    key: str  # dotted, e.g. "optimizer.dion2_config.fraction"
    hint: Any  # resolved type hint
    default: Any  # the value a default-constructed RunConfig holds here
    help: str
    is_section: bool


@cache
def type_hints(cls: type) -> dict[str, Any]:
    """Resolved hints of a dataclass (the schema modules use ``from __future__ import annotations``)."""
    return typing.get_type_hints(cls)


def is_section_type(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def iter_options(cls: type, prefix: str = "", instance: Any = None) -> Iterator[Option]:
    """Depth-first walk in declaration order: a section's entry comes before its own fields."""
    instance = cls() if instance is None else instance
    hints = type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        hint = hints[f.name]
        value = getattr(instance, f.name)
        section = is_section_type(hint)
        yield Option(key, hint, value, f.metadata.get("help", ""), section)
        if section:
            yield from iter_options(hint, key + ".", value)


def section_list_item(hint: Any) -> type | None:
    """The item class of a list-of-sections field (``phases: list[PhaseConfig]``), else None."""
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint) or (Any,)
        if is_section_type(item):
            return item
    return None


def iter_list_items(cls: type) -> Iterator[tuple[Option, list[Option]]]:
    """Each list-of-sections field of the tree with its item's options, keyed ``phases[].steps``.

    Items are set as a whole (a YAML list of mappings), so their keys are documented but not CLI overrides.
    """
    for o in iter_options(cls):
        item = section_list_item(o.hint)
        if item is not None:
            yield o, [dataclasses.replace(i, key=f"{o.key}[].{i.key}") for i in iter_options(item)]


def leaf_options(cls: type) -> list[Option]:
    return [o for o in iter_options(cls) if not o.is_section]


def section_doc(cls: type) -> str:
    """The first paragraph of a dataclass docstring (dataclasses synthesise one when none is written)."""
    doc = cls.__doc__ or ""
    if doc.startswith(cls.__name__ + "("):
        return ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def union_args(hint: Any) -> tuple[Any, ...] | None:
    """Members of ``X | Y`` / ``Optional[X]``, else None."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        return typing.get_args(hint)
    return None


def type_name(hint: Any) -> str:
    """Human spelling of a hint, in YAML terms: ``int | null``, ``'adamw' | 'dion2'``, ``list[float]``."""
    if hint is type(None):
        return "null"
    members = union_args(hint)
    if members is not None:
        return " | ".join(type_name(m) for m in members)
    if typing.get_origin(hint) is Literal:
        return " | ".join(repr(c) for c in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint) or (Any,)
        return "list[mapping]" if is_section_type(item) else f"list[{type_name(item)}]"
    if is_section_type(hint):
        return "section"
    return getattr(hint, "__name__", str(hint))


def format_value(value: Any) -> str:
    """A value as a user would type it in YAML or on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if dataclasses.is_dataclass(value):
        return "{...}"
    return str(value) if not isinstance(value, float) else repr(value)
