"""docs/configuration.md and the key snapshot are generated from the schema and must be checked in up to date."""

from __future__ import annotations

import os

from neobert_pt.config import docgen

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def read(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def test_configuration_reference_is_up_to_date():
    assert read("docs", "configuration.md") == docgen.markdown(), (
        f"docs/configuration.md is stale; regenerate it with `{docgen.DOC_COMMAND}`"
    )


def test_key_snapshot_is_up_to_date():
    """Every dotted key with its type and default; a new or changed knob shows up in review as a diff here."""
    assert read("tests", "unit", "config", "snapshot_keys.txt") == docgen.snapshot(), (
        f"the config keys changed; if intended, regenerate with `{docgen.SNAPSHOT_COMMAND}`"
    )


def test_reference_has_a_table_row_for_every_key():
    text = docgen.markdown()
    for line in docgen.snapshot().splitlines():
        key = line.split(":", 1)[0]
        assert f"| `{key}` |" in text, key
