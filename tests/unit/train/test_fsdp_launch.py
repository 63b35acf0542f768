"""FSDP2 launch settings: what neobert_pt reads from an accelerate FSDP config, what it refuses, and that building the
Accelerator leaves the launch environment as it found it (neobert_pt shards the model itself, train/distributed.py)."""

from __future__ import annotations

import os

import pytest
from accelerate.state import AcceleratorState, GradientState

from neobert_pt.config.errors import ConfigError
from neobert_pt.train import distributed

# What `accelerate launch --config_file configs/accelerate/fsdp2_cpu_2proc.yaml` exports for its fsdp_config.
FSDP_ENV = {
    "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_TRANSFORMER_CLS_TO_WRAP": "NeoBERTLayer", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
    "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_OFFLOAD_PARAMS": "false", "FSDP_ACTIVATION_CHECKPOINTING": "false",
}


@pytest.fixture
def fsdp_env(monkeypatch):
    for key, value in FSDP_ENV.items():
        monkeypatch.setenv(key, value)
    return monkeypatch


def test_the_fsdp_config_is_read_through_accelerates_plugin(fsdp_env):
    plugin = distributed.fsdp_settings()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.transformer_cls_names_to_wrap == ["NeoBERTLayer"]
    assert distributed.sharded_launch(2) and not distributed.sharded_launch(1)
    fsdp_env.delenv("ACCELERATE_USE_FSDP")
    assert distributed.fsdp_settings() is None and not distributed.sharded_launch(2)


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("FSDP_VERSION", "1", "FSDP v1 is not supported; set fsdp_config.fsdp_version: 2"),
    ("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT", "fsdp_state_dict_type=FULL_STATE_DICT is not supported"),
    ("FSDP_ACTIVATION_CHECKPOINTING", "true", "--trainer.activation_checkpointing true"),
])
def test_unsupported_fsdp_settings_are_one_line(fsdp_env, key, value, expected):
    fsdp_env.setenv(key, value)
    with pytest.raises(ConfigError) as err:
        distributed.make_accelerator()
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_one_process_with_an_fsdp_config_runs_plainly_and_the_environment_is_untouched(fsdp_env, caplog):
    fsdp_env.setenv("WORLD_SIZE", "1")
    before = dict(os.environ)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        acc = distributed.make_accelerator()
        assert distributed.mode(acc) == "single"
        assert not acc.is_fsdp2  # accelerate never shards: neobert_pt does, and only with several processes
        assert dict(os.environ) == before  # the FSDP switches were hidden from accelerate only while it was built
        assert "shards nothing" in caplog.text
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
