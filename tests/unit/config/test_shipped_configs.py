"""The shipped YAML configs load cleanly, and each comparison family differs only in its optimizer block."""

from __future__ import annotations

import glob
import os
import warnings

import pytest

from neobert_pt.config import config_to_dict, load_config

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
CONFIG_DIR = os.path.join(ROOT, "configs", "pretraining")
FAMILY_100M = {
    "pretrain_neobert100m_smollm2data.yaml": "adamw",
    "pretrain_neobert100m_smollm2data_muonclip.yaml": "muonclip",
    "pretrain_neobert100m_smollm2data_dion2.yaml": "dion2",
    "pretrain_neobert100m_smollm2data_dion.yaml": "dion",
    "pretrain_neobert100m_smollm2data_adana.yaml": "adana",
    "pretrain_neobert100m_smollm2data_dana_star_mk4.yaml": "dana-star-mk4",
}
# The robustness matrix's cpu profile (jobs/experiment_dion2_robustness.sh PROFILE=cpu).
FAMILY_ROBUSTNESS_CPU = {
    "robustness_cpu/adamw.yaml": "adamw",
    "robustness_cpu/muonclip.yaml": "muonclip",
    "robustness_cpu/dion2.yaml": "dion2",
}


def load(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a shipped config must not set blocks its optimizer ignores
        return load_config(os.path.join(CONFIG_DIR, name), [])


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIG_DIR, "**", "*.yaml"), recursive=True)),
                         ids=lambda p: os.path.relpath(p, CONFIG_DIR))
def test_every_shipped_config_loads_without_warnings(path):
    load(os.path.relpath(path, CONFIG_DIR))


@pytest.mark.parametrize("family", [FAMILY_100M, FAMILY_ROBUSTNESS_CPU], ids=["100m", "robustness_cpu"])
def test_family_is_identical_except_the_optimizer_block(family):
    dicts = {name: config_to_dict(load(name)) for name in family}
    for name, optimizer in family.items():
        assert dicts[name]["optimizer"]["name"] == optimizer
    reference = dicts[next(iter(family))]
    sections = set(reference) - {"optimizer"}
    assert sections == {"model", "dataset", "tokenizer", "datacollator", "trainer", "scheduler", "wandb", "seed",
                        "phases"}
    for name, resolved in dicts.items():
        for section in sections:
            assert resolved[section] == reference[section], f"{name}: section {section!r} differs from the adamw config"


@pytest.mark.parametrize("name", ["neobert100m_two_phase.yaml", "neobert100m_modernbert_style.yaml",
                                  "neobert100m_inverse_masking.yaml"])
def test_phase_recipes_are_the_100m_config_plus_a_phases_block(name):
    recipe = config_to_dict(load(os.path.join("phases", name)))
    base = config_to_dict(load("pretrain_neobert100m_smollm2data.yaml"))
    assert recipe.pop("phases") and base.pop("phases") == []
    assert recipe == base


def test_100m_recipe_values():
    cfg = load("pretrain_neobert100m_smollm2data.yaml")
    assert (cfg.model.hidden_size, cfg.model.num_hidden_layers, cfg.model.num_attention_heads) == (768, 12, 12)
    assert cfg.dataset.name == "HuggingFaceTB/smollm-corpus" and cfg.dataset.config_name == "fineweb-edu-dedup"
    assert cfg.dataset.streaming is True and cfg.dataset.max_seq_length == 1024
    assert cfg.tokenizer.name == "bert-base-uncased"
    assert (cfg.trainer.per_device_train_batch_size, cfg.trainer.gradient_accumulation_steps) == (32, 1)
    assert cfg.trainer.mixed_precision == "bf16"
    assert (cfg.trainer.max_steps, cfg.trainer.save_steps, cfg.trainer.eval_steps) == (100000, 1000, 1000)
    assert (cfg.scheduler.name, cfg.scheduler.warmup_steps) == ("cosine", 2000)
    assert (cfg.optimizer.lr, cfg.optimizer.betas, cfg.optimizer.weight_decay) == (6e-4, [0.9, 0.98], 0.01)


def test_250m_is_the_100m_recipe_with_28_layers():
    small = config_to_dict(load("pretrain_neobert100m_smollm2data.yaml"))
    large = config_to_dict(load("pretrain_neobert250m_smollm2data.yaml"))
    assert large["model"]["num_hidden_layers"] == 28
    assert large["trainer"]["output_dir"] != small["trainer"]["output_dir"]
    for section in ("dataset", "tokenizer", "datacollator", "scheduler", "optimizer"):
        assert large[section] == small[section], section
    large["model"]["num_hidden_layers"] = 12
    assert large["model"] == small["model"]


def test_tiny_config_is_offline_and_small():
    cfg = load("pretrain_tiny.yaml")
    assert cfg.dataset.name == "embedded" and cfg.tokenizer.name == "embedded"
    assert (cfg.model.hidden_size, cfg.model.num_hidden_layers, cfg.model.num_attention_heads) == (256, 4, 4)
    assert cfg.dataset.max_seq_length == 128 and cfg.trainer.per_device_train_batch_size == 16
    assert cfg.trainer.mixed_precision == "no" and cfg.optimizer.name == "adamw"
    assert 300 <= cfg.trainer.max_steps <= 600 and cfg.scheduler.warmup_steps < cfg.trainer.max_steps
