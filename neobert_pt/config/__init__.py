"""Run configuration: dataclass schema, YAML + dotted-override loader, CLI and generated reference.

Exports resolve lazily: ``neobert_pt.optim.config`` imports ``neobert_pt.config.fields`` while the schema imports
``neobert_pt.optim.config``, so an eager import here would be circular.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RunConfig": "neobert_pt.config.schema",
    "ModelConfig": "neobert_pt.config.schema",
    "DatasetConfig": "neobert_pt.config.schema",
    "TokenizerConfig": "neobert_pt.config.schema",
    "DataCollatorConfig": "neobert_pt.config.schema",
    "TrainerConfig": "neobert_pt.config.schema",
    "SchedulerConfig": "neobert_pt.config.schema",
    "WandbConfig": "neobert_pt.config.schema",
    "ConfigError": "neobert_pt.config.errors",
    "ConfigWarning": "neobert_pt.config.loader",
    "load_config": "neobert_pt.config.loader",
    "config_to_dict": "neobert_pt.config.loader",
    "dump_config": "neobert_pt.config.loader",
    "save_config": "neobert_pt.config.loader",
    "parse_args": "neobert_pt.config.cli",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
