"""pretrain.py's command line: --help, --print-config, exit codes, and the runbook commands users type (jobs/,
docs/robustness.md)."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys

import pytest

from neobert_pt.config.cli import parse_args
from neobert_pt.config.schema import RunConfig
from neobert_pt.config.tree import leaf_options
from neobert_pt.config.yamlio import parse_yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
PRETRAIN = os.path.join(ROOT, "scripts", "pretraining", "pretrain.py")
DION2 = "configs/pretraining/pretrain_neobert100m_smollm2data_dion2.yaml"
ADAMW = "configs/pretraining/pretrain_neobert100m_smollm2data.yaml"


def run_pretrain(*args: str) -> subprocess.CompletedProcess:
    """Run the real script from the repository root, as a user would (offline, no W&B)."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, PRETRAIN, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_runbook_dion2_robustness_command_resolves():
    """The Dion2 robustness runbook command (jobs/experiment_dion2_robustness.sh), verbatim, plus --print-config."""
    proc = run_pretrain(
        DION2,
        "--trainer.max_steps", "200",
        "--optimizer.dion2_config.enable_clipping", "true",
        "--optimizer.dion2_config.clipping_threshold", "50.0",
        "--optimizer.dion2_config.clipping_interval", "10",
        "--trainer.output_dir", "./outputs/exp/dion2_robustness/dion2_qk_smoke",
        "--trainer.save_steps", "1000",
        "--trainer.resume_from_checkpoint", "latest",
        "--wandb.mode", "disabled",
        "--seed", "42",
        "--print-config",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "pretrain.py: warning" not in proc.stderr
    resolved = parse_yaml(proc.stdout)
    dion2 = resolved["optimizer"]["dion2_config"]
    assert resolved["optimizer"]["name"] == "dion2"
    assert dion2["enable_clipping"] is True
    assert dion2["clipping_threshold"] == 50.0 and isinstance(dion2["clipping_threshold"], float)
    assert dion2["clipping_interval"] == 10
    assert resolved["trainer"]["max_steps"] == 200
    assert resolved["trainer"]["output_dir"] == "./outputs/exp/dion2_robustness/dion2_qk_smoke"
    assert resolved["trainer"]["save_steps"] == 1000
    assert resolved["trainer"]["resume_from_checkpoint"] == "latest"
    assert resolved["wandb"]["mode"] == "disabled"
    assert resolved["seed"] == 42
    # Untouched values come from the YAML file, not the dataclass defaults.
    assert resolved["dataset"]["name"] == "HuggingFaceTB/smollm-corpus"
    assert resolved["trainer"]["per_device_train_batch_size"] == 32


@pytest.fixture(scope="module")
def pretrain_main():
    """``main`` of the real script file, run in-process (a subprocess costs ~10 s of imports on a loaded CPU)."""
    return runpy.run_path(PRETRAIN, run_name="pretrain_under_test")["main"]


def test_runbook_launch_argv_resolves(pretrain_main, capsys):
    """What `accelerate launch [--num_processes 2 | --config_file ...] pretrain.py CONFIG ...` hands the script."""
    with pytest.raises(SystemExit) as info:
        pretrain_main([os.path.join(ROOT, ADAMW), "--trainer.max_steps", "200", "--print-config"])
    assert info.value.code == 0
    resolved = parse_yaml(capsys.readouterr().out)
    assert resolved["trainer"]["max_steps"] == 200
    assert resolved["optimizer"]["name"] == "adamw"
    assert resolved["optimizer"]["lr"] == 6e-4


def test_config_error_exits_2_with_one_paragraph(pretrain_main, capsys):
    with pytest.raises(SystemExit) as info:
        pretrain_main([os.path.join(ROOT, DION2), "--trainer.max_step", "200"])
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert err.startswith("pretrain.py: error: Unknown config key trainer.max_step. Did you mean trainer.max_steps?")
    assert len(err.strip().splitlines()) == 2  # the message and the --help pointer
    assert out == ""


def test_help_lists_sections_and_every_key_with_type_default_and_doc(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--help"], prog="pretrain.py")
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: pretrain.py [CONFIG]")
    assert "sections: model, dataset, tokenizer, datacollator, trainer, optimizer, scheduler, wandb, seed" in out
    for option in leaf_options(RunConfig):
        assert f"  --{option.key} " in out, option.key
    assert "  --optimizer.dion2_config.clipping_threshold float  (default: 50.0)" in out
    assert "  --trainer.resume_from_checkpoint bool | str | null  (default: null)" in out
    assert "  --seed int  (default: 0)" in out
    assert "QK-clip threshold tau" in out  # field docs are included
    assert "optimizer.dion2_config: Dion2" in out  # sub-block headers carry the dataclass doc


def test_help_works_anywhere_in_argv(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args([os.path.join(ROOT, ADAMW), "--trainer.max_steps", "5", "-h"])
    assert info.value.code == 0 and "--model.hidden_size int" in capsys.readouterr().out


def test_print_config_without_config_file_prints_defaults(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--print-config"])
    assert info.value.code == 0
    assert parse_yaml(capsys.readouterr().out)["trainer"]["max_steps"] == RunConfig().trainer.max_steps


def test_parse_args_returns_config_without_print_flag():
    cfg = parse_args([os.path.join(ROOT, ADAMW), "--seed=7", "--optimizer.lr", "1e-4"])
    assert (cfg.seed, cfg.optimizer.lr, cfg.model.num_hidden_layers) == (7, 1e-4, 12)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["missing.yaml"], "Config file not found: missing.yaml"),
        (["--trainer.logging_steps", "many"], "trainer.logging_steps: cannot use 'many' (str); expected int."),
        (["--optimizer.name", "sgd"], "optimizer.name: 'sgd' is not an allowed value"),
        (["--trainer.max_steps", "5", "extra"], "Unexpected argument 'extra'"),
    ],
)
def test_errors_exit_2(capsys, argv, fragment):
    with pytest.raises(SystemExit) as info:
        parse_args(argv, prog="pretrain.py")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("pretrain.py: error: ") and fragment in err


def test_unselected_subblock_warning_is_printed_not_fatal(capsys):
    cfg = parse_args([os.path.join(ROOT, ADAMW), "--optimizer.muon_config.clipping_interval", "3"])
    assert cfg.optimizer.muon_config.clipping_interval == 3
    err = capsys.readouterr().err
    assert "pretrain.py: warning: optimizer.muon_config is set (clipping_interval) but optimizer.name is 'adamw'" in err


def test_print_config_says_where_every_value_came_from(capsys, monkeypatch):
    """Scaling-rule dimensions, `auto` numbers, file, command line and defaults, each named; still loadable YAML."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as info:
        parse_args([os.path.join(ROOT, "configs", "pretraining", "pretrain_tiny.yaml"), "--model.scaling_rule",
                    "enoki", "--model.heads", "8", "--trainer.max_steps", "auto", "--optimizer.lr", "auto",
                    "--trainer.tokens_per_param", "0.5", "--print-config"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    lines = {line.split(":")[0].strip(): line for line in out.splitlines() if ":" in line}
    assert lines["hidden_size"].endswith("# scaling_rule enoki: 64 * heads (heads=8) (replaces the config file value)")
    assert "# scaling_rule enoki: 3 * heads // 4 (heads=8)" in lines["num_hidden_layers"]
    assert "# auto: 0.5 tokens/param x" in lines["max_steps"] and "at 2 process(es) (command line: auto)" in out
    assert "# auto: DANA power law for adamw" in lines["lr"]
    assert lines["max_position_embeddings"].endswith("# config file")
    assert lines["heads"].endswith("# command line") and lines["norm_eps"].endswith("# default")
    resolved = parse_yaml(out)
    assert (resolved["model"]["hidden_size"], resolved["model"]["num_hidden_layers"]) == (512, 6)
    steps, lr = resolved["trainer"]["max_steps"], resolved["optimizer"]["lr"]
    assert isinstance(steps, int) and steps > 1 and isinstance(lr, float)
