"""YAML with YAML-1.2 scalars: ``1e-4`` is a float, only ``true``/``false`` are booleans, dates stay strings.

PyYAML implements YAML 1.1, where ``lr: 1e-4`` is the STRING "1e-4" (a float needs a dot), ``yes``/``on`` are
booleans and ``012`` is octal. The prior fork patched two keys by hand and left every other ``1e-2`` a string; this
loader fixes the scalar rules once, for config files and for CLI override values alike.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

_BOOL_TAG = "tag:yaml.org,2002:bool"
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_REPLACED = {_BOOL_TAG, _INT_TAG, _FLOAT_TAG, _TIMESTAMP_TAG}


class Yaml12Loader(yaml.SafeLoader):
    """SafeLoader whose bool/int/float resolution follows the YAML 1.2 core schema, and which refuses a key given
    twice in one mapping (PyYAML silently keeps the last: a repeated ``trainer:`` section would drop the first)."""

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in _REPLACED]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {first}); give each key once",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


class Yaml12Dumper(yaml.SafeDumper):
    """SafeDumper that quotes every string a YAML 1.2 *or* 1.1 reader would read as a non-string (``'no'``,
    ``'1e-4'``), so a saved config.yaml means the same to this loader and to plain ``yaml.safe_load``."""

    yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeDumper.yaml_implicit_resolvers.items()}


_FLOAT_RX = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
# Order matters: the first matching resolver wins, so "42" must be tried as int before float. The dumper keeps the
# 1.1 resolvers too: a string matching either schema gets quoted.
for _cls in (Yaml12Loader, Yaml12Dumper):
    _cls.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
    _cls.add_implicit_resolver(_INT_TAG, re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$"), list("-+0123456789"))
    _cls.add_implicit_resolver(_FLOAT_TAG, _FLOAT_RX, list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    """Parse a YAML document with the 1.2 scalar rules."""
    return yaml.load(text, Loader=Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def parse_value(text: str) -> Any:
    """One CLI value: ``1e-4`` → float, ``true`` → bool, ``[0.9,0.95]`` → list, ``null`` → None, else the string.

    An empty string stays an empty string, and text that is not valid YAML (``a: b: c``) is taken verbatim.
    """
    if text.strip() == "":
        return text
    try:
        return parse_yaml(text)
    except yaml.YAMLError:
        return text


def dump_yaml(data: Any) -> str:
    """Block-style YAML in field order (not alphabetical), readable and re-loadable by :func:`parse_yaml`."""
    return yaml.dump(data, Dumper=Yaml12Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)
