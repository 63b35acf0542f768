"""A saved config means the same to our YAML-1.2 loader and to a plain YAML-1.1 reader (yaml.safe_load)."""

import yaml

from neobert_pt.config import config_to_dict, dump_config, load_config
from neobert_pt.config.yamlio import parse_yaml


def test_dumped_config_reads_identically_with_yaml_1_1_and_1_2():
    cfg = load_config("configs/pretraining/robustness_cpu/dion2.yaml",
                      ["--trainer.mixed_precision", "no", "--wandb.name", "1e-4", "--wandb.group", "on"])
    text = dump_config(cfg)
    expected = config_to_dict(cfg)
    assert parse_yaml(text) == expected
    assert yaml.safe_load(text) == expected  # 'no', 'on', '1e-4' stay strings for a 1.1 reader too
    assert "{" not in text  # block style throughout
