"""Load a :class:`RunConfig` from a YAML file plus dotted CLI overrides, strictly.

Flow: YAML file → nested dict → each override written into that dict at its dotted path → one validating walk
over the dataclass tree (type hints drive coercion, so every field of every section is overridable with no
whitelist) → the dataclasses are built once, bottom-up, so every ``__post_init__`` cross-field check sees the final
values. Every problem raises :class:`ConfigError` naming the dotted key; an optimizer sub-block that the selected
optimizer does not read only warns.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
import warnings
from collections.abc import Mapping
from typing import Any, Literal

from neobert_pt.config.errors import ConfigError
from neobert_pt.config.schema import RunConfig
from neobert_pt.config.tree import (
    format_value,
    is_section_type,
    iter_options,
    section_list_item,
    type_hints,
    type_name,
    union_args,
)
from neobert_pt.config.yamlio import dump_yaml, parse_value, parse_yaml
from neobert_pt.optim.catalog import subblock_users

__all__ = [
    "ConfigWarning",
    "config_to_dict",
    "dump_config",
    "key_sources",
    "load_config",
    "parse_overrides",
    "save_config",
]

class ConfigWarning(UserWarning):
    """A config value that is accepted but has no effect (e.g. a sub-block of an optimizer that is not selected)."""


class _Unset:
    """Marks 'no raw CLI text' so str fields can keep exactly what the user typed (``--wandb.name 1e3``)."""


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] | None = None) -> RunConfig:
    """The resolved run config: defaults ← YAML file at ``path`` (optional) ← ``overrides`` (CLI tokens).

    ``overrides`` accepts ``--a.b.c value``, ``--a.b.c=value`` and ``a.b.c=value``; values parse as YAML 1.2.
    """
    tree: dict[str, Any] = _read_file(path) if path is not None else {}
    raw_text: dict[str, str] = {}
    for key, text in parse_overrides(overrides or []):
        _assign(tree, key, parse_value(text))
        raw_text[key] = text
    values = _validate_section(RunConfig, tree, "", raw_text)
    _warn_unused_subblocks(values)
    return _build(RunConfig, values)


def key_sources(path: str | os.PathLike[str] | None, overrides: list[str] | None = None) -> dict[str, str]:
    """Where each explicitly set dotted key came from: ``'file'`` or ``'override'`` (unlisted keys are defaults)."""
    sources: dict[str, str] = {}

    def walk(node: Any, prefix: str, source: str) -> None:
        if isinstance(node, Mapping):
            for name, value in node.items():
                walk(value, f"{prefix}{name}.", source)
        elif prefix:
            sources[prefix[:-1]] = source

    walk(_read_file(path) if path is not None else {}, "", "file")
    for key, text in parse_overrides(overrides or []):
        walk(parse_value(text), f"{key}.", "override")
    return sources


def parse_overrides(tokens: list[str]) -> list[tuple[str, str]]:
    """Split CLI tokens into (dotted key, raw value text) pairs, in order (later ones win)."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        body = token[2:] if token.startswith("--") else token
        if "=" in body:
            key, text = body.split("=", 1)
        elif token.startswith("--"):
            key = body
            if i >= len(tokens) or tokens[i].startswith("--"):
                raise ConfigError(f"--{key} needs a value, e.g. `--{key} VALUE` or `--{key}=VALUE`.")
            text = tokens[i]
            i += 1
        else:
            raise ConfigError(
                f"Unexpected argument {token!r}: overrides look like `--section.key value` (the config file path, "
                "if any, must come first)."
            )
        if not key or key.startswith("-") or any(part == "" for part in key.split(".")):
            raise ConfigError(f"Malformed override {token!r}: expected `--section.key value`.")
        pairs.append((key, text))
    return pairs


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (lists copied), in declaration order."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any) -> str:
    """The resolved config as YAML; :func:`load_config` reads it back to an equal config."""
    return dump_yaml(config_to_dict(cfg))


def save_config(cfg: Any, path: str | os.PathLike[str]) -> None:
    """Write the resolved config (e.g. ``<output_dir>/config.yaml``), creating parent directories."""
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(dump_config(cfg))


# ---------------------------------------------------------------------------------------------------------------
# Reading and merging


def _read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        where = "" if os.path.isabs(path) else f" (relative to the working directory {os.getcwd()})"
        raise ConfigError(
            f"Config file not found: {path}{where}. Pass an existing YAML file, e.g. "
            "configs/pretraining/pretrain_tiny.yaml."
        )
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise ConfigError(f"Config file {path} is not UTF-8 text (byte {err.start} cannot be decoded); save it as "
                          "UTF-8.") from None
    except OSError as err:
        raise ConfigError(f"Config file {path} cannot be read: {err.strerror}.") from None
    try:
        data = parse_yaml(text)
    except Exception as err:  # yaml.YAMLError and its subclasses carry the line/column
        detail = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        raise ConfigError(f"Config file {path} is not valid YAML: {detail}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"Config file {path} must be a mapping of sections (model:, trainer:, optimizer:, ...), "
            f"but its top level is a {type(data).__name__}."
        )
    return data


def _assign(tree: dict[str, Any], key: str, value: Any) -> None:
    """Write ``value`` at dotted ``key``; unknown names are caught later by validation, with suggestions."""
    *parents, leaf = key.split(".")
    node = tree
    for depth, part in enumerate(parents):
        child = node.get(part)
        if not isinstance(child, dict):
            if child is not None:
                raise ConfigError(f"Cannot set {key}: {'.'.join(parents[: depth + 1])} is not a section.")
            child = node[part] = {}
        node = child
    node[leaf] = value


# ---------------------------------------------------------------------------------------------------------------
# Validation and coercion (driven by type hints)


def _validate_section(cls: type, data: Any, prefix: str, raw_text: dict[str, str]) -> dict[str, Any]:
    """Check a mapping against dataclass ``cls``; return its coerced fields (sub-sections as nested dicts)."""
    where = prefix.rstrip(".") or "the config"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {format_value(data)!r}.")
    hints = type_hints(cls)
    out: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if not isinstance(name, str) or name not in hints:
            # Name the full key the user typed: `--dion2_config.fraction` fails at `dion2_config`.
            typed = next((k for k in raw_text if k.startswith(f"{key}.")), str(key))
            raise ConfigError(_unknown_key_message(typed))
        hint = hints[name]
        if is_section_type(hint):
            out[name] = _validate_section(hint, value, key + ".", raw_text)
        elif section_list_item(hint) is not None:
            out[name] = _validate_section_list(section_list_item(hint), value, key, raw_text)
        else:
            out[name] = _coerce(value, hint, key, raw_text.get(key, _Unset))
    return out


def _validate_section_list(item: type, data: Any, key: str, raw_text: dict[str, str]) -> list[Any]:
    """A list of mappings, each checked against ``item`` (``phases``); entries are built here, in order."""
    if data is None:
        return []
    if not isinstance(data, list):
        raise ConfigError(f"{key} must be a list of mappings (one per entry), got {format_value(data)!r}.")
    built = []
    for i, entry in enumerate(data):
        where = f"{key}[{i}]"
        if isinstance(entry, Mapping):
            fields = list(type_hints(item))
            for name in entry:
                if name not in fields:
                    close = difflib.get_close_matches(str(name), fields, n=1, cutoff=0.6)
                    hint = f" Did you mean {where}.{close[0]}?" if close else f" Allowed keys: {', '.join(fields)}."
                    raise ConfigError(f"Unknown config key {where}.{name}.{hint}")
        built.append(_build(item, _validate_section(item, entry, where + ".", raw_text)))
    return built


def _coerce(value: Any, hint: Any, key: str, raw: Any) -> Any:
    try:
        return _convert(value, hint, raw)
    except _Mismatch:
        pass
    choices = _choices(hint)
    if choices is not None and isinstance(value, str):
        close = difflib.get_close_matches(value, [str(c) for c in choices], n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"{key}: {value!r} is not an allowed value; choose one of {', '.join(repr(c) for c in choices)}.{hint}"
        )
    shown = raw if isinstance(raw, str) else format_value(value)
    raise ConfigError(f"{key}: cannot use {shown!r} ({_kind(value)}); expected {type_name(hint)}.")


class _Mismatch(Exception):
    """Internal: ``value`` does not fit ``hint``."""


def _convert(value: Any, hint: Any, raw: Any) -> Any:
    members = union_args(hint)
    if members is not None:
        if value is None and type(None) in members:
            return None
        for member in members:
            if member is type(None):
                continue
            try:
                return _convert(value, member, raw)
            except _Mismatch:
                continue
        raise _Mismatch
    if hint is Any:
        return value
    if typing.get_origin(hint) is Literal:
        if isinstance(value, str) and value in typing.get_args(hint):
            return value
        raise _Mismatch
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return raw if isinstance(raw, str) else str(value)
        raise _Mismatch
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint) or (Any,)
        if not isinstance(value, list):
            raise _Mismatch
        return [_convert(v, item, _Unset) for v in value]
    raise TypeError(f"config schema uses an unsupported type {hint!r}")


def _choices(hint: Any) -> tuple[Any, ...] | None:
    members = union_args(hint) or (hint,)
    literal = [c for m in members if typing.get_origin(m) is Literal for c in typing.get_args(m)]
    return tuple(literal) if literal and len(members) == 1 else None


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "mapping"}.get(
        type(value), type(value).__name__
    )


def _all_keys() -> list[str]:
    return [o.key for o in iter_options(RunConfig)]


def _unknown_key_message(key: str) -> str:
    keys = _all_keys()
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not match:
        # `--max_steps`, `--dion2.fraction`: compare the last name against every key's last name.
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in reversed(keys)}
        leaf_match = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
        match = [by_leaf[leaf_match[0]]] if leaf_match else []
    hint = f" Did you mean {match[0]}?" if match else ""
    return f"Unknown config key {key}.{hint}"


# ---------------------------------------------------------------------------------------------------------------
# Building and post-checks


def _build(cls: type, values: dict[str, Any]) -> Any:
    """Instantiate ``cls`` once from validated values; missing fields keep their defaults."""
    hints = type_hints(cls)
    kwargs = {
        name: _build(hints[name], value) if is_section_type(hints[name]) else value for name, value in values.items()
    }  # lists of sections arrive built by _validate_section_list
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"Invalid {cls.__name__}: {err}") from None


def _warn_unused_subblocks(values: dict[str, Any]) -> None:
    """Warn about sub-block keys set to a non-default value for an optimizer that does not read them.

    Keys equal to their default are not reported, so a saved resolved config (which lists every block) reloads quietly.
    """
    optimizer = values.get("optimizer", {})
    defaults = RunConfig().optimizer
    name = optimizer.get("name", defaults.name)
    for block, users in subblock_users().items():  # which optimizer.name values read each sub-block
        default_block = getattr(defaults, block, None)
        changed = sorted(k for k, v in optimizer.get(block, {}).items() if v != getattr(default_block, k, object()))
        if changed and name not in users:
            warnings.warn(
                f"optimizer.{block} is set ({', '.join(changed)}) but optimizer.name is {name!r}; it is ignored "
                f"(it applies to {', '.join(users)}).",
                ConfigWarning,
                stacklevel=3,
            )
