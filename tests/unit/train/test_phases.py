"""Phases as pure functions of config and step (schedules, lengths, data position), their validation, the scaling
rule and the `auto` budget."""

from __future__ import annotations

import math

import pytest

from neobert_pt.config import ConfigError, load_config
from neobert_pt.config.scaling import derive_dimensions, evaluate, scaling_rules
from neobert_pt.optim.lr_rule import count_non_embedding_params, suggest_peak_lr
from neobert_pt.train import phases as ph
from neobert_pt.train.budget import meta_model, non_embedding_params, resolve_auto

BASE = ["--dataset.max_seq_length", "64", "--model.max_position_embeddings", "128",
        "--trainer.per_device_train_batch_size", "4", "--trainer.gradient_accumulation_steps", "2",
        "--trainer.max_steps", "auto"]


def cfg(phases: str, *extra: str):
    return load_config(None, [*BASE, "--phases", phases, *extra])


def plan(phases: str, *extra: str, world_size: int = 1):
    run = cfg(phases, *extra)
    resolve_auto(run, world_size)
    return ph.build_plan(run, world_size, run.trainer.max_steps)


# ---- lengths -------------------------------------------------------------------------------------------------


def test_lengths_in_steps_tokens_and_until_step_chain_back_to_back():
    p = plan("[{steps: 5}, {tokens: 3000, max_seq_length: 128}, {until_step: 20}]", world_size=2)
    # phase 1: 4 rows x 2 acc x 2 processes x 128 tokens = 2048 tokens/step -> ceil(3000 / 2048) = 2 steps
    assert [(x.start, x.end) for x in p] == [(0, 5), (5, 7), (7, 20)]
    assert [x.name for x in p] == ["phase0", "phase1", "phase2"]
    assert p[1].max_seq_length == 128 and p[0].max_seq_length == p[2].max_seq_length == 64


def test_open_last_phase_runs_to_max_steps():
    p = plan("[{steps: 5}, {name: rest}]", "--trainer.max_steps", "12")
    assert [(x.name, x.start, x.end) for x in p] == [("phase0", 0, 5), ("rest", 5, 12)]


def test_tokens_with_batch_warmup_count_the_smaller_early_steps():
    run = cfg("[{tokens: 2560, batch_warmup_steps: 4, batch_warmup_start_accumulation: 1, "
              "gradient_accumulation_steps: 4}]")
    phase = ph.phase_settings(run, 0, run.phases[0], 0, 0, 1)
    assert [ph.accumulation_at(phase, s) for s in range(6)] == [1, 1, 2, 3, 4, 4]
    # micro-batch = 4 rows x 64 tokens = 256; warmup steps give 256, 256, 512, 768 (1792), then 1024 per step
    assert ph.steps_for_tokens(phase, 2560, 1) == 5 and ph.tokens_for_steps(phase, 5, 1) == 2816


# ---- schedules -------------------------------------------------------------------------------------------------


def test_masking_schedules():
    p = plan("[{steps: 4, mlm_probability: 0.3}, {steps: 5, mlm_schedule: linear, mlm_probability: 0.3, "
             "mlm_probability_end: 0.1}, {steps: 5, mlm_schedule: cosine, mlm_probability: 0.3, "
             "mlm_probability_end: 0.1}, {steps: 6, mlm_schedule: step, mlm_values: [0.3, 0.15, 0.05]}, {steps: 1}]",
             "--datacollator.mlm_probability", "0.2")
    rates = [ph.mlm_probability_at(ph.phase_at(p, s), s) for s in range(21)]
    assert rates[:4] == [0.3] * 4
    assert rates[4:9] == pytest.approx([0.3, 0.25, 0.2, 0.15, 0.1])
    assert rates[9:14] == pytest.approx([0.3, 0.3 - 0.2 * (1 - math.cos(math.pi / 4)) / 2, 0.2,
                                         0.1 + 0.2 * (1 + math.cos(3 * math.pi / 4)) / 2, 0.1])
    assert rates[14:20] == [0.3, 0.3, 0.15, 0.15, 0.05, 0.05]
    assert rates[20] == 0.2  # a phase without a rate uses datacollator.mlm_probability


def test_lr_segments_compose_with_the_run_schedule():
    p = plan("[{steps: 4, lr_schedule: segment, lr_warmup_steps: 2}, {steps: 3}, "
             "{steps: 4, lr_schedule: segment, lr_warmup_steps: 2, lr_peak: 0.5, lr_decay: linear, lr_decay_steps: 2, "
             "lr_end: 0.1}]")

    def run_factor(step):
        return 0.8  # stands in for the scheduler section

    f = [ph.lr_factor_at(p, s, run_factor) for s in range(11)]
    assert f[:4] == [0.5, 1.0, 1.0, 1.0]  # warmup from 0, then the segment's peak
    assert f[4:7] == [0.8] * 3  # the run's schedule
    assert f[7:] == pytest.approx([0.8 + (0.5 - 0.8) / 2, 0.5, 0.3, 0.1])  # warm from 0.8 to 0.5, decay to 0.1


@pytest.mark.parametrize("decay, mid", [("cosine", 0.5), ("1-sqrt", 1 - math.sqrt(0.5))])
def test_lr_decay_shapes(decay, mid):
    p = plan(f"[{{steps: 2, lr_schedule: segment, lr_decay: {decay}, lr_end: 0.0}}]")
    assert [ph.lr_factor_at(p, s, lambda _: 1.0) for s in range(2)] == pytest.approx([mid, 0.0])


# ---- data position across a re-pack --------------------------------------------------------------------------


def test_continue_position_keeps_the_token_offset():
    # 2 epochs of 1600 rows, then 10 global micro-batches of 16 rows of 64 tokens into the third.
    old = {"kind": "map", "rows_consumed": 2 * 1600 + 160, "rows_per_epoch": 1600, "batch_size": 8, "world_size": 2}
    new = {"kind": "map", "rows_consumed": 0, "rows_per_epoch": 800, "batch_size": 4, "world_size": 2}
    assert ph.continue_position(old, 64, new, 128) == {**new, "rows_consumed": 2 * 800 + 80}
    assert ph.continue_position(old, 64, new, 96)["rows_consumed"] == 2 * 800 + 14 * 8  # ceil(10240 / 768)
    short = {**new, "rows_per_epoch": 72}
    assert ph.continue_position(old, 64, short, 128) == {**short, "rows_consumed": 3 * 72}  # past the epoch
    s_old = {"kind": "stream", "rows_consumed": 48, "batch_size": 8, "world_size": 2}
    s_new = {"kind": "stream", "rows_consumed": 0, "batch_size": 2, "world_size": 2}
    assert ph.continue_position(s_old, 64, s_new, 256)["rows_consumed"] == 12


# ---- bad input: one line each --------------------------------------------------------------------------------


@pytest.mark.parametrize("phases, extra, fragment", [
    ("[{steps: 0}]", [], "phases[0].steps must be >= 1 (a phase cannot be empty), got 0."),
    ("[{steps: 10}, {until_step: 8}]", [], "phases[1].until_step=8 overlaps the previous phases"),
    ("[{steps: 10}, {until_step: 10}]", [], "phases[1].until_step=10 overlaps"),
    ("[{steps: 4, tokens: 100}]", [], "phases[0] sets steps and tokens; give its length one way only."),
    ("[{}, {steps: 3}]", [], "phases[0] has no length"),
    ("[{steps: 3, max_seq_length: 256}]", [], "phases[0].max_seq_length (256) exceeds model.max_position_embeddings"),
    ("[{steps: 3, mlm_probability: 1.2}]", [], "phases[0].mlm_probability = 1.2 leaves the masking rate range"),
    ("[{steps: 3, mlm_schedule: linear, mlm_probability: 0.3, mlm_probability_end: -0.1}]", [],
     "phases[0].mlm_probability_end = -0.1 leaves"),
    ("[{steps: 3, mlm_schedule: step, mlm_values: [0.3, 0.0]}]", [], "phases[0].mlm_values[1] = 0.0 leaves"),
    ("[{steps: 3, mlm_schedule: linear}]", [], "needs phases[0].mlm_probability_end"),
    ("[{steps: 3, rope_theta: 0}]", [], "phases[0].rope_theta must be > 0"),
    ("[{steps: 3, stepz: 4}]", [], "Unknown config key phases[0].stepz. Did you mean phases[0].steps?"),
    ("[{steps: 3}, {steps: 2}]", ["--trainer.max_steps", "9"], "trainer.max_steps is 9 but the phases add up to 5"),
    ("[{steps: 3, name: a}, {steps: 2, name: a}]", [], "phases[1].name 'a' is already the name of phases[0]"),
    ("{steps: 3}", [], "phases must be a list of mappings"),
])
def test_bad_phases_give_one_clear_line(phases, extra, fragment):
    with pytest.raises(ConfigError) as err:
        cfg(phases, *extra)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_overlap_known_only_with_the_world_size_is_caught_when_planned():
    run = cfg("[{tokens: 4096}, {until_step: 3}]")  # 512 tokens/step at 1 process: phase 0 ends at step 8
    with pytest.raises(ConfigError, match=r"phases\[1\] would be empty or overlap .* until_step=3, .* step 8"):
        resolve_auto(run, 1)


# ---- scaling rule --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [4, 8, 12, 16])
def test_scaling_rule_dimensions_match_the_formulas(heads):
    for rule, layers in (("neobert", heads), ("enoki", 3 * heads // 4)):
        model = load_config(None, ["--model.scaling_rule", rule, "--model.heads", str(heads)]).model
        assert (model.num_attention_heads, model.hidden_size, model.num_hidden_layers, model.intermediate_size) == (
            heads, 64 * heads, layers, 4 * 64 * heads)
        assert {k: v for k, (v, _) in derive_dimensions(rule, heads).items()} == {
            "num_attention_heads": heads, "hidden_size": 64 * heads, "num_hidden_layers": layers,
            "intermediate_size": 256 * heads}


def test_scaling_rule_file_and_formula_errors():
    assert {"neobert", "enoki"} <= set(scaling_rules())
    assert evaluate("3 * heads // 4 + (2 ** 3)", {"heads": 12}) == 17
    with pytest.raises(ConfigError, match="only integers"):
        evaluate("__import__('os')", {"heads": 1})
    with pytest.raises(ConfigError, match="'bert' is not a rule of scaling_rules.yaml; choose one of"):
        load_config(None, ["--model.scaling_rule", "bert", "--model.heads", "4"])
    with pytest.raises(ConfigError, match="needs model.heads >= 1"):
        load_config(None, ["--model.scaling_rule", "neobert"])
    with pytest.raises(ConfigError, match="gives model.num_hidden_layers = 3 \\* heads // 4 = 0"):
        load_config(None, ["--model.scaling_rule", "enoki", "--model.heads", "1"])


# ---- auto budget ---------------------------------------------------------------------------------------------


def test_max_steps_and_lr_auto_compose():
    run = load_config(None, ["--model.scaling_rule", "neobert", "--model.heads", "4", "--trainer.max_steps", "auto",
                             "--optimizer.lr", "auto", "--dataset.max_seq_length", "128",
                             "--trainer.per_device_train_batch_size", "8"])
    notes = resolve_auto(run, world_size=2)
    params = non_embedding_params(run)
    assert params == count_non_embedding_params(meta_model(run))
    assert run.trainer.max_steps == math.ceil(20 * params / (8 * 2 * 128))
    assert run.optimizer.lr == suggest_peak_lr("adamw", params, tokens_per_step=8 * 2 * 128)
    assert set(notes) == {"trainer.max_steps", "optimizer.lr"} and "20 tokens/param" in notes["trainer.max_steps"]


def test_max_steps_auto_with_an_open_last_phase_spends_the_rest_of_the_budget():
    run = cfg("[{steps: 10}, {max_seq_length: 128, per_device_train_batch_size: 2}]", "--trainer.tokens_per_param",
              "0.01")
    resolve_auto(run, 1)
    budget = math.ceil(0.01 * non_embedding_params(run))
    rest = budget - 10 * 4 * 2 * 64
    assert run.trainer.max_steps == 10 + math.ceil(rest / (2 * 2 * 128))


def test_batch_warmup_in_tokens_rises_with_the_tokens_consumed():
    run = cfg("[{steps: 10, batch_warmup_tokens: 4096, batch_warmup_start_accumulation: 1, "
              "gradient_accumulation_steps: 5}]")
    (phase,) = ph.build_plan(run, 2, 10)
    # micro-batch = 4 rows x 2 processes x 64 tokens = 512; accumulation = 1 + 4 * seen // 4096 with seen before the
    # step: 0 -> 1, 512 -> 1, 1024 -> 2, 2048 -> 3, 3584 -> 4; 5632 >= 4096 ends the warmup
    assert phase.ramp == (1, 1, 2, 3, 4)
    assert [ph.accumulation_at(phase, s) for s in range(7)] == [1, 1, 2, 3, 4, 5, 5]
    assert ph.tokens_for_steps(phase, 7, 2) == 512 * (11 + 10)
    with pytest.raises(ConfigError, match="sets batch_warmup_steps and batch_warmup_tokens"):
        cfg("[{steps: 3, batch_warmup_steps: 2, batch_warmup_tokens: 100}]")
