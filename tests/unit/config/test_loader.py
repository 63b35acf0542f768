"""load_config: override syntaxes, YAML-1.2 value parsing, coercion, every error path, warnings, round trip."""

from __future__ import annotations

import dataclasses
import typing
import warnings

import pytest

from neobert_pt.config import ConfigError, ConfigWarning, RunConfig, config_to_dict, load_config, save_config
from neobert_pt.config.loader import parse_overrides
from neobert_pt.config.tree import leaf_options
from neobert_pt.config.yamlio import parse_value
from neobert_pt.optim.catalog import optimizer_entries, optimizer_entry, subblock_users


def write(tmp_path, text: str, name: str = "run.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def load_quiet(path, overrides):
    """Load and fail on any warning (most tests expect none)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_config(path, overrides)


# ---- value parsing -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1e-4", 1e-4),
        ("-3E+2", -300.0),
        (".5", 0.5),
        ("42", 42),
        ("true", True),
        ("False", False),
        ("yes", "yes"),  # YAML 1.1 would make this a bool
        ("on", "on"),
        ("null", None),
        ("[0.9,0.95]", [0.9, 0.95]),
        ("2024-01-01", "2024-01-01"),  # not a date
        ("latest", "latest"),
        ("", ""),
        ("a: b: c", "a: b: c"),  # invalid YAML is taken verbatim
    ],
)
def test_parse_value_follows_yaml_1_2(text, expected):
    value = parse_value(text)
    assert value == expected and type(value) is type(expected)


def test_scientific_notation_in_yaml_file_is_a_float(tmp_path):
    path = write(tmp_path, "optimizer:\n  lr: 1e-4\n  weight_decay: 1e-2\n  eps: 1.0e-8\nmodel:\n  norm_eps: 1e-6\n")
    cfg = load_quiet(path, [])
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.optimizer.eps, cfg.model.norm_eps) == (
        1e-4,
        1e-2,
        1e-8,
        1e-6,
    )
    assert isinstance(cfg.optimizer.lr, float)


# ---- override syntaxes ---------------------------------------------------------------------------------------


def test_every_override_syntax(tmp_path):
    path = write(tmp_path, "trainer:\n  max_steps: 10\n")
    cfg = load_quiet(
        path,
        [
            "--trainer.max_steps", "200",
            "--optimizer.lr=1e-4",
            "scheduler.warmup_steps=7",
            "--seed", "42",
            "--optimizer.betas", "[0.9,0.95]",
            "--wandb.tags", "[a, b]",
            "--wandb.entity", "null",
            "--model.norm_eps", "-1e-3",  # a negative number is a value, not a flag
        ],
    )  # fmt: skip
    assert cfg.trainer.max_steps == 200
    assert cfg.optimizer.lr == 1e-4
    assert cfg.scheduler.warmup_steps == 7
    assert cfg.seed == 42
    assert cfg.optimizer.betas == [0.9, 0.95]
    assert cfg.wandb.tags == ["a", "b"]
    assert cfg.wandb.entity is None
    assert cfg.model.norm_eps == -1e-3


def test_later_override_wins_and_overrides_beat_file(tmp_path):
    path = write(tmp_path, "seed: 1\n")
    assert load_quiet(path, ["--seed", "2", "--seed=3"]).seed == 3


def test_every_leaf_field_is_overridable():
    """No whitelist: set each leaf to a valid non-default value through the CLI and read it back."""
    defaults = RunConfig()
    for option in leaf_options(RunConfig):
        value = _other_valid_value(option.hint, option.default)
        if value is _SKIP:
            continue
        text = value if isinstance(value, str) else _yaml_text(value)
        overrides = ["--" + option.key, text]
        if option.key.startswith("optimizer.") and option.key.count(".") == 2:
            sub = option.key.split(".")[1]
            overrides += ["--optimizer.name", subblock_users()[sub][0]]
        try:
            cfg = load_quiet(None, overrides)
        except ConfigError as err:  # a cross-field rule may reject the lone change; then it must say so by name
            assert option.key.split(".")[-1] in str(err), (option.key, err)
            continue
        got = _get(cfg, option.key)
        assert got == value and got != _get(defaults, option.key), option.key


_SKIP = object()


def _other_valid_value(hint, default):
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Literal:
        others = [c for c in args if c != default]
        return others[0] if others else _SKIP
    if type(None) in args:
        inner = [a for a in args if a is not type(None)][-1]
        return _other_valid_value(inner, None) if default is None else None
    if hint is bool:
        return not default
    if hint is int:
        return (default or 0) + 3
    if hint is float:
        return (default or 0.0) * 0.5 + 0.0123  # never equal to a default (fixed point 0.0246)
    if hint is str:
        return "other_value"
    if typing.get_origin(hint) is list:
        return ["x"] if typing.get_args(hint)[0] is str else [0.5, 0.75]
    return _other_valid_value(args[0], default) if args else _SKIP


def _yaml_text(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    return repr(value)


def _get(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_whole_subblock_as_mapping():
    cfg = load_quiet(None, ["--optimizer.name", "dion2", "--optimizer.dion2_config", "{fraction: 0.5, ef_decay: 0.9}"])
    assert (cfg.optimizer.dion2_config.fraction, cfg.optimizer.dion2_config.ef_decay) == (0.5, 0.9)


# ---- coercion ------------------------------------------------------------------------------------------------


def test_int_accepted_for_float_and_str_keeps_typed_text():
    cfg = load_quiet(None, ["--optimizer.lr", "1", "--wandb.name", "1e3", "--trainer.output_dir", "2024"])
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)
    assert cfg.wandb.name == "1e3"  # what the user typed, not str(1000.0)
    assert cfg.trainer.output_dir == "2024"


def test_float_or_literal_union():
    assert load_quiet(None, ["--optimizer.lr", "auto"]).optimizer.lr == "auto"
    assert load_quiet(None, ["--optimizer.lr", "3e-4"]).optimizer.lr == 3e-4


@pytest.mark.parametrize(
    "value, expected",
    [("latest", "latest"), ("true", "latest"), ("false", None), ("null", None), ("ckpt/step_5", "ckpt/step_5")],
)
def test_resume_from_checkpoint_spellings(value, expected):
    assert load_quiet(None, ["--trainer.resume_from_checkpoint", value]).trainer.resume_from_checkpoint == expected


# ---- errors --------------------------------------------------------------------------------------------------


def error_of(path, overrides) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


@pytest.mark.parametrize(
    "overrides, full_key, suggestion",
    [
        (["--trainer.max_step", "3"], "trainer.max_step", "trainer.max_steps"),
        (["--optimizer.dion2_config.clipping_treshold", "5"], "optimizer.dion2_config.clipping_treshold",
         "optimizer.dion2_config.clipping_threshold"),
        (["--max_steps", "3"], "max_steps", "trainer.max_steps"),
        (["--dion2_config.fraction", "0.5"], "dion2_config.fraction", "optimizer.dion2_config.fraction"),
        (["--wandb.projet=x"], "wandb.projet", "wandb.project"),
    ],
)  # fmt: skip
def test_unknown_key_names_full_key_and_closest(overrides, full_key, suggestion):
    msg = error_of(None, overrides)
    assert f"Unknown config key {full_key}." in msg
    assert f"Did you mean {suggestion}?" in msg


def test_unknown_key_in_yaml_file(tmp_path):
    msg = error_of(write(tmp_path, "trainer:\n  save_step: 5\n"), [])
    assert "trainer.save_step" in msg and "Did you mean trainer.save_steps?" in msg


def test_unknown_key_without_close_match_has_no_suggestion():
    msg = error_of(None, ["--zzzz.qqqq", "1"])
    assert "Unknown config key zzzz.qqqq." in msg and "Did you mean" not in msg


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["--trainer.max_steps", "abc"], "trainer.max_steps: cannot use 'abc' (str); expected int | 'auto'."),
        (["--trainer.max_steps", "2.5"], "trainer.max_steps: cannot use '2.5' (float); expected int | 'auto'."),
        (["--trainer.torch_compile", "1"], "trainer.torch_compile: cannot use '1' (int); expected bool."),
        (["--trainer.torch_compile", "yes"], "trainer.torch_compile: cannot use 'yes' (str); expected bool."),
        (["--optimizer.lr", "fast"], "optimizer.lr: cannot use 'fast' (str); expected float | 'auto'."),
        (["--optimizer.betas", "0.9"], "optimizer.betas: cannot use '0.9' (float); expected list[float]."),
        (["--optimizer.betas", "[0.9,x]"], "optimizer.betas: cannot use '[0.9,x]' (list); expected list[float]."),
        (["--model.vocab_size", "big"], "model.vocab_size: cannot use 'big' (str); expected int | null."),
        (["--trainer", "5"], "trainer must be a mapping"),
    ],
)
def test_bad_type_names_key_value_and_expected_type(overrides, expected):
    assert expected in error_of(None, overrides)


def test_bad_type_in_yaml_file(tmp_path):
    msg = error_of(write(tmp_path, "optimizer:\n  eps: tiny\n"), [])
    assert msg == "optimizer.eps: cannot use 'tiny' (str); expected float."


def test_bad_choice_lists_allowed_values():
    msg = error_of(None, ["--optimizer.name", "dino2"])
    assert "optimizer.name: 'dino2' is not an allowed value" in msg
    for name in ("adamw", "adana", "dana-star-mk4", "muonclip", "dion2", "dion"):
        assert repr(name) in msg
    assert "Did you mean 'dion2'?" in msg
    msg = error_of(None, ["--optimizer.dion2_config.adjust_lr", "spectral"])
    assert "'spectral_norm', 'rms_norm', 'none'" in msg or "'rms_norm'" in msg


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    msg = error_of(str(missing), [])
    assert msg.startswith(f"Config file not found: {missing}")


def test_yaml_file_that_is_not_a_mapping(tmp_path):
    msg = error_of(write(tmp_path, "- a\n- b\n"), [])
    assert "must be a mapping of sections" in msg and "list" in msg and "run.yaml" in msg


def test_invalid_yaml_file(tmp_path):
    msg = error_of(write(tmp_path, "trainer: [unclosed\n"), [])
    assert "is not valid YAML" in msg and "run.yaml" in msg


def test_empty_yaml_file_means_defaults(tmp_path):
    assert load_quiet(write(tmp_path, "# nothing\n"), []) == RunConfig()


@pytest.mark.parametrize(
    "tokens, expected",
    [
        (["--trainer.max_steps"], "--trainer.max_steps needs a value"),
        (["--trainer.max_steps", "--seed", "1"], "--trainer.max_steps needs a value"),
        (["stray"], "Unexpected argument 'stray'"),
        (["--trainer..max_steps", "1"], "Malformed override"),
    ],
)
def test_malformed_overrides(tokens, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_overrides(tokens)


def test_setting_below_a_scalar_is_rejected(tmp_path):
    msg = error_of(write(tmp_path, "trainer:\n  max_steps: 5\n"), ["--trainer.max_steps.x", "1"])
    assert "trainer.max_steps is not a section" in msg


# ---- cross-field checks run once, after every override ----------------------------------------------------------


def test_cross_field_check_sees_final_values():
    # hidden 100 is only valid together with 10 heads: the check must run after both overrides are applied.
    cfg = load_quiet(None, ["--model.hidden_size", "100", "--model.num_attention_heads", "10"])
    assert (cfg.model.hidden_size, cfg.model.num_attention_heads) == (100, 10)
    msg = error_of(None, ["--model.hidden_size", "100"])
    assert "model.hidden_size (100) must be divisible by model.num_attention_heads (12)" in msg


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["--dataset.max_seq_length", "8192"], "dataset.max_seq_length (8192) exceeds model.max_position_embeddings"),
        (["--trainer.max_steps", "0"], "trainer.max_steps must be >= 1, got 0"),
        (["--trainer.save_steps", "0"], "trainer.save_steps must be >= 1 or null"),
        (["--datacollator.mlm_probability", "1.5"], "datacollator.mlm_probability must be in (0, 1)"),
        (["--datacollator.random_replace_prob", "0.5"], "mask_replace_prob + datacollator.random_replace_prob"),
        (["--dataset.name", "json"], "set dataset.data_files"),
        (["--scheduler.min_lr_ratio", "2"], "scheduler.min_lr_ratio must be in [0, 1]"),
    ],
)
def test_impossible_combinations_say_why(overrides, fragment):
    assert fragment in error_of(None, overrides)


# ---- optimizer sub-blocks for an unselected optimizer ------------------------------------------------------------


def test_unselected_subblock_warns_from_cli():
    with pytest.warns(
        ConfigWarning, match=r"optimizer\.dion2_config is set \(fraction\) but optimizer\.name is 'adamw'"
    ):
        cfg = load_config(None, ["--optimizer.dion2_config.fraction", "0.5"])
    assert cfg.optimizer.dion2_config.fraction == 0.5  # kept, just unused


def test_unselected_subblock_warns_from_yaml(tmp_path):
    path = write(tmp_path, "optimizer:\n  name: dion2\n  muon_config:\n    momentum: 0.9\n")
    with pytest.warns(
        ConfigWarning, match=r"optimizer\.muon_config .* 'dion2'; it is ignored \(it applies to muonclip\)"
    ):
        load_config(path, [])


def test_selected_subblock_does_not_warn(tmp_path):
    path = write(tmp_path, "optimizer:\n  name: adamw\n  dana_config:\n    kappa: 0.8\n")
    cfg = load_quiet(path, ["--optimizer.name", "adana"])  # the final name is what counts
    assert cfg.optimizer.dana_config.kappa == 0.8


def test_optimizer_section_is_derived_from_the_catalog():
    """optimizer.name's choices and the sub-block fields are exactly the catalog's names and sub-blocks."""
    hints = typing.get_type_hints(type(RunConfig().optimizer))
    subblocks = {
        f.name for f in dataclasses.fields(type(RunConfig().optimizer)) if dataclasses.is_dataclass(hints[f.name])
    }
    assert subblocks == set(subblock_users())
    assert list(typing.get_args(hints["name"])) == [e.name for e in optimizer_entries()]
    for block, users in subblock_users().items():
        assert hints[block] is optimizer_entry(users[0]).config


# ---- output --------------------------------------------------------------------------------------------------


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_quiet(
        None,
        ["--optimizer.name", "dion2", "--optimizer.eps", "1e-10", "--wandb.name", "yes", "--wandb.tags", "[dion2, '1e-4', 'true', '012']",
         "--trainer.resume_from_checkpoint", "latest", "--optimizer.lr", "auto"],
    )  # fmt: skip
    assert cfg.wandb.tags == ["dion2", "1e-4", "true", "012"]  # strings that look like numbers must stay strings
    out = tmp_path / "run" / "config.yaml"
    save_config(cfg, out)
    again = load_quiet(str(out), [])
    assert again == cfg
    assert config_to_dict(again)["optimizer"]["dion2_config"]["fraction"] == 0.25
