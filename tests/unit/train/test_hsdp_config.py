"""HSDP launch settings: accelerate's parallelism_config is validated before accelerate sees it (one clear line)."""

from __future__ import annotations

import pytest

from neobert_pt.config.errors import ConfigError
from neobert_pt.train import distributed


def _env(monkeypatch, replicate: str, shard: str, world: str = "4") -> None:
    monkeypatch.setenv("ACCELERATE_USE_PARALLELISM_CONFIG", "true")
    monkeypatch.setenv("PARALLELISM_CONFIG_DP_REPLICATE_SIZE", replicate)
    monkeypatch.setenv("PARALLELISM_CONFIG_DP_SHARD_SIZE", shard)
    monkeypatch.setenv("WORLD_SIZE", world)


def test_hsdp_shape_from_the_accelerate_config(monkeypatch):
    _env(monkeypatch, "2", "2")
    assert distributed.hsdp_shape() == (2, 2)
    _env(monkeypatch, "1", "4")
    assert distributed.hsdp_shape() is None  # a 1-D FSDP2 mesh
    monkeypatch.delenv("ACCELERATE_USE_PARALLELISM_CONFIG")
    assert distributed.hsdp_shape() is None


@pytest.mark.parametrize(("replicate", "shard", "expected"), [
    ("3", "2", "dp_replicate_size=3 x dp_shard_size=2 = 6 does not equal the 4 launched processes"),
    ("4", "1", "dp_shard_size=1 with dp_replicate_size=4 is plain data parallelism"),
    ("two", "2", "must be integers"),
])
def test_a_mesh_that_does_not_fit_the_world_is_one_line(monkeypatch, replicate, shard, expected):
    _env(monkeypatch, replicate, shard)
    with pytest.raises(ConfigError) as err:
        distributed.make_accelerator()
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_dion_under_deepspeed_is_one_line(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError) as err:
        distributed.make_accelerator()
    msg = str(err.value)
    assert "DeepSpeed is not supported" in msg and "dion" in msg and "\n" not in msg
