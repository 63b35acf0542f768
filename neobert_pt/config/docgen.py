"""Generate ``docs/configuration.md`` and the key snapshot from the config dataclasses.

    python -m neobert_pt.config.docgen > docs/configuration.md
    python -m neobert_pt.config.docgen --snapshot > tests/unit/config/snapshot_keys.txt

Tests compare both checked-in files with this output, so a new or changed option is visible in review.
"""

from __future__ import annotations

import sys

from neobert_pt.config.schema import RunConfig
from neobert_pt.config.tree import (
    Option,
    format_value,
    iter_list_items,
    iter_options,
    section_doc,
    section_list_item,
    type_name,
)
from neobert_pt.optim.catalog import optimizer_entries, subblock_users

DOC_COMMAND = "python -m neobert_pt.config.docgen > docs/configuration.md"
SNAPSHOT_COMMAND = "python -m neobert_pt.config.docgen --snapshot > tests/unit/config/snapshot_keys.txt"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _subblock_lines() -> str:
    return "\n".join(
        f"  - `optimizer.{block}` is read by {', '.join(f'`{n}`' for n in users)}."
        for block, users in subblock_users().items()
    )


def _optimizer_table() -> str:
    """Every registered optimizer (neobert_pt/optim/catalog.py): name, sub-block, `lr: auto` support, summary."""
    lines = ["| `optimizer.name` | sub-block | `lr: auto` | what |", "|---|---|---|---|"]
    for e in optimizer_entries():
        block = f"`optimizer.{e.block}`" if e.block else "—"
        lines.append(f"| `{e.name}` | {block} | {'yes' if e.lr_fits else 'no'} | {_cell(e.summary)} |")
    return "\n".join(lines)


def _intro() -> str:
    return f"""\
# Configuration reference

<!-- Generated from the dataclasses in neobert_pt/config/schema.py and neobert_pt/optim/config.py and from the
     optimizer catalog (neobert_pt/optim/catalog.py).
     Do not edit by hand; regenerate with: {DOC_COMMAND} -->

A run is configured by one YAML file plus command-line overrides. Every key in the tables below can be set in the
file (nested under its section) or on the command line with its dotted name; there is no whitelist.

```
python scripts/pretraining/pretrain.py configs/pretraining/pretrain_neobert100m_smollm2data_dion2.yaml \\
  --trainer.max_steps 200 --optimizer.dion2_config.enable_clipping true --seed 42
python scripts/pretraining/pretrain.py CONFIG --print-config   # show the resolved config and exit
python scripts/pretraining/pretrain.py --help                  # every key with type, default and doc
```

## How values are read

- Precedence: dataclass defaults, then the YAML file, then overrides from left to right (a later one wins).
- Override syntax: `--section.key VALUE`, `--section.key=VALUE` (or `section.key=VALUE`); top-level keys are
  written without a section (`--seed 42`). A whole sub-block can be given as a YAML mapping
  (`--optimizer.dion2_config '{{fraction: 0.5, ef_decay: 0.9}}'`).
- Values parse as YAML 1.2, in the file and on the command line alike: `1e-4` is a float (PyYAML alone would read
  it as a string), only `true`/`false` are booleans, `[0.9,0.95]` is a list, `null` is None; anything else is a
  string. An int is accepted where a float is expected; booleans are strict (`1`, `yes` are not booleans).
- `trainer.resume_from_checkpoint` accepts `latest` / `true` (the checkpoint the `latest` pointer names, verified;
  fresh start if `output_dir` has no checkpoint folder yet, an error if it has some but none is usable), a path, or
  `false` / `null`; it is stored as `latest`, the path, or null. On resume the checkpoint supplies the state
  (weights, moments, step, data position, RNG) and the current config every hyperparameter and the schedule: each
  setting that differs from the checkpoint's `config.yaml` is logged once (`optimizer.lr 0.0006 → 1e-05`).
- The resolved config is written to `<trainer.output_dir>/config.yaml`; loading that file reproduces the run.

## Optimizers

Every value of `optimizer.name`, with the sub-block it reads and whether `optimizer.lr: auto` has a power law for it
(docs/optimizers.md has the details; adding one is a single `register_optimizer` call):

{_optimizer_table()}

## Errors and warnings

- Unknown key: the message names the full dotted key and the closest valid one
  (`Unknown config key trainer.max_step. Did you mean trainer.max_steps?`).
- Wrong type: the dotted key, the value and the expected type (`trainer.logging_steps: cannot use 'x' (str); expected int.`).
- Bad choice: the allowed values (and the closest one).
- Impossible combinations (checked once all overrides are applied) name the keys involved and how to fix them,
  e.g. `model.hidden_size` not divisible by `model.num_attention_heads`.
- A missing config file or a file whose top level is not a mapping is reported with its path.
- `pretrain.py` prints errors as one paragraph and exits with status 2.
- Optimizer sub-block keys set to non-default values for an optimizer that is not selected are ignored with a
  warning (a saved config, which lists every block at its defaults, reloads quietly):
{_subblock_lines()}
"""


def _table(rows: list[Option]) -> list[str]:
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for o in rows:
        lines.append(
            f"| `{o.key}` | {_cell(type_name(o.hint))} | `{_cell(format_value(o.default))}` | {_cell(o.help)} |"
        )
    return lines


def markdown() -> str:
    """The full configuration reference."""
    options = list(iter_options(RunConfig))
    out = [_intro().rstrip("\n")]
    top_level = [o for o in options if "." not in o.key and not o.is_section]
    for section in (o for o in options if o.is_section):
        out += ["", f"{'#' * (section.key.count('.') + 2)} `{section.key}`", ""]
        doc = section_doc(section.hint)
        out += [doc, ""] if doc else []
        direct = [o for o in options if not o.is_section and o.key.rsplit(".", 1)[0] == section.key]
        out += _table(direct)
    if top_level:
        out += ["", "## Top level", ""] + _table(top_level)
    for field, items in iter_list_items(RunConfig):
        doc = section_doc(section_list_item(field.hint))
        out += ["", f"## Each entry of `{field.key}`", "", f"Written as a YAML list of mappings under `{field.key}:` "
                "(not as single dotted overrides). " + doc, ""]
        out += _table(items)
    return "\n".join(out) + "\n"


def snapshot() -> str:
    """One line per dotted key: ``key: type = default`` (sections excluded)."""
    items = [i for _, entries in iter_list_items(RunConfig) for i in entries]
    return "".join(
        f"{o.key}: {type_name(o.hint)} = {format_value(o.default)}\n"
        for o in [*iter_options(RunConfig), *items]
        if not o.is_section
    )


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    sys.stdout.write(snapshot() if args == ["--snapshot"] else markdown())


if __name__ == "__main__":
    main()
