"""Command line of ``pretrain.py``: ``[CONFIG] [--section.key VALUE ...] [--print-config] [-h]``.

Hand-rolled rather than argparse: the option set is the whole dataclass tree (no whitelist, no second declaration of
each knob), and argparse would reject any dotted key it was not told about. Config errors exit with status 2 and one
readable paragraph, never a traceback.
"""

from __future__ import annotations

import sys
import textwrap
import warnings
from typing import NoReturn

from neobert_pt.config.errors import ConfigError
from neobert_pt.config.loader import dump_config, load_config
from neobert_pt.config.schema import RunConfig
from neobert_pt.config.tree import format_value, iter_options, section_doc, type_name

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
        sys.stdout.write(dump_config(cfg))
        raise SystemExit(0)
    return cfg


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
    return "\n".join(lines) + "\n"
