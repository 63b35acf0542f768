"""Run configuration: dataclass schema, YAML + dotted-override loader, CLI and generated reference.

Plain imports: the optimizer section comes from ``neobert_pt/optim/config.py``, which imports only torch-free modules
(the leaf modules ``neobert_pt/errors.py`` and ``neobert_pt/fields.py`` and the optimizer catalog), never this
package, so there is no import cycle and importing the config imports no optimizer.
"""

from neobert_pt.config.cli import parse_args
from neobert_pt.config.errors import ConfigError
from neobert_pt.config.loader import ConfigWarning, config_to_dict, dump_config, load_config, save_config
from neobert_pt.config.schema import (
    DataCollatorConfig,
    DatasetConfig,
    ModelConfig,
    RunConfig,
    SchedulerConfig,
    TokenizerConfig,
    TrainerConfig,
    WandbConfig,
)

__all__ = [
    "ConfigError",
    "ConfigWarning",
    "DataCollatorConfig",
    "DatasetConfig",
    "ModelConfig",
    "RunConfig",
    "SchedulerConfig",
    "TokenizerConfig",
    "TrainerConfig",
    "WandbConfig",
    "config_to_dict",
    "dump_config",
    "load_config",
    "parse_args",
    "save_config",
]
