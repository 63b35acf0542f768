"""Command line of ``pretrain.py``: ``[CONFIG] [--section.key VALUE ...] [--print-config] [-h]``.

Hand-rolled rather than argparse: the option set is the whole dataclass tree (no whitelist, no second declaration of
each knob), and argparse would reject any dotted key it was not told about. Config errors exit with status 2 and one
readable paragraph, never a traceback.
"""

from __future__ import annotations

import os
import sys
import textwrap
import warnings
from typing import NoReturn

import yaml

from neobert_pt.config.errors import ConfigError
from neobert_pt.config.loader import config_to_dict, key_sources, load_config
from neobert_pt.config.schema import RunConfig
from neobert_pt.config.tree import format_value, iter_list_items, iter_options, section_doc, type_name
from neobert_pt.config.yamlio import Yaml12Dumper

_HELP_FLAGS = ("-h", "--help")
_PRINT_FLAG = "--print-config"


def parse_args(argv: list[str], prog: str = "pretrain.py") -> RunConfig:
    """Resolve the run config from ``argv`` (without the program name).

    ``--help`` prints the generated option list and ``--print-config`` the resolved YAML; both exit 0.
    """
    if any(token in _HELP_FLAGS for token in argv):
        sys.stdout.write(help_text(prog))
        raise SystemExit(0)
    print_config = _PRINT_FLAG in argv
    tokens = [t for t in argv if t != _PRINT_FLAG]
    path = tokens[0] if tokens and not tokens[0].startswith("-") and "=" not in tokens[0] else None
    overrides = tokens[1:] if path is not None else tokens
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cfg = load_config(path, overrides)
    except ConfigError as err:
        _fail(prog, str(err))
    for w in caught:
        print(f"{prog}: warning: {w.message}", file=sys.stderr)
    if print_config:
        try:
            notes, plan_lines = resolve_numbers(cfg)
            text = annotated_config(cfg, key_sources(path, overrides), notes)
            sys.stdout.write(text + "".join(f"# {line}\n" for line in plan_lines))
        except ConfigError as err:
            _fail(prog, str(err))
        raise SystemExit(0)
    return cfg


def resolve_numbers(cfg: RunConfig) -> tuple[dict[str, str], list[str]]:
    """Derived values and their origin (scaling-rule dimensions, ``auto`` numbers resolved in place), and the
    resolved phases, one line each.

    ``auto`` values depend on the number of processes; ``--print-config`` uses ``WORLD_SIZE`` (1 when unset), the
    variable ``accelerate launch`` sets, so under a launcher it prints what the run will use.
    """
    from neobert_pt.config.scaling import derivation_notes

    notes, plan_lines = derivation_notes(cfg.model), []
    if cfg.trainer.max_steps == "auto" or cfg.optimizer.lr == "auto" or cfg.phases:
        from neobert_pt.train import phases  # the training stack: only when there is something to resolve
        from neobert_pt.train.budget import resolve_auto

        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        notes.update(resolve_auto(cfg, world_size))
        if cfg.phases:
            plan = phases.build_plan(cfg, world_size, cfg.trainer.max_steps)
            plan_lines = ["resolved phases:", *phases.describe_plan(plan, world_size)]
    return notes, plan_lines


def annotated_config(cfg: RunConfig, sources: dict[str, str], notes: dict[str, str]) -> str:
    """The resolved config as YAML, every value followed by ``# <where it came from>`` (loadable as is)."""
    lines: list[str] = []

    def emit(node: dict, prefix: str, indent: int) -> None:
        for name, value in node.items():
            key = f"{prefix}{name}"
            if isinstance(value, dict):
                lines.append(f"{' ' * indent}{name}:")
                emit(value, key + ".", indent + 2)
                continue
            origin = notes.get(key) or {"file": "config file", "override": "command line"}.get(
                sources.get(key, ""), "default")
            where = {"file": "config file", "override": "command line"}.get(sources.get(key, ""))
            if key in notes and where:
                origin += f" ({where}: auto)" if notes[key].startswith("auto") else f" (replaces the {where} value)"
            text = yaml.dump({name: value}, Dumper=Yaml12Dumper, sort_keys=False, default_flow_style=False,
                             allow_unicode=True, width=10**6).rstrip("\n").split("\n")
            lines.append(f"{' ' * indent}{text[0]}  # {origin}")
            lines.extend(f"{' ' * indent}{t}" for t in text[1:])

    emit(config_to_dict(cfg), "", 0)
    return "\n".join(lines) + "\n"


def _fail(prog: str, message: str) -> NoReturn:
    print(f"{prog}: error: {message}\nRun `{prog} --help` to list every key.", file=sys.stderr)
    raise SystemExit(2)


def help_text(prog: str = "pretrain.py") -> str:
    """Usage, then every section and dotted key with its type, default and doc (generated from the schema)."""
    options = list(iter_options(RunConfig))
    sections = [o.key for o in options if "." not in o.key]
    lines = [
        f"usage: {prog} [CONFIG] [--section.key VALUE ...] [--print-config] [-h]",
        "",
        *textwrap.wrap(
            "Pretrain a NeoBERT encoder. CONFIG is a YAML file (optional: without it the built-in defaults are "
            "used). Any key below can be overridden as `--section.key VALUE` or `--section.key=VALUE`; values "
            "parse as YAML (1e-4, true, [0.9,0.95], null). Later overrides win.",
            width=100,
        ),
        "",
        "options:",
        "  -h, --help        show this help and exit",
        "  --print-config    print the resolved config as YAML and exit",
        "",
        "sections: " + ", ".join(sections),
    ]
    for option in options:
        if option.is_section:
            doc = section_doc(option.hint)
            lines += ["", f"{option.key}:" + (f" {doc}" if doc else "")]
            continue
        if "." not in option.key:
            lines += ["", "top level:"]
        lines.append(f"  --{option.key} {type_name(option.hint)}  (default: {format_value(option.default)})")
        lines += textwrap.wrap(option.help, width=100, initial_indent=" " * 6, subsequent_indent=" " * 6)
    for field, items in iter_list_items(RunConfig):
        lines += ["", f"{field.key}[]: keys of each entry (set {field.key} as a YAML list of mappings; docs/phases.md)"]
        for option in items:
            lines.append(f"  {option.key} {type_name(option.hint)}  (default: {format_value(option.default)})")
            lines += textwrap.wrap(option.help, width=100, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines) + "\n"
