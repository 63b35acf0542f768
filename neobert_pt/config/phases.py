"""Validation of the ``phases`` list at config load: one clear line per problem, naming ``phases[i].key``.

Only the checks that need no world size live here (the config layer); lengths in tokens become steps in
:mod:`neobert_pt.train.phases`, which reports the remaining conflicts the same way when the run is planned.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from neobert_pt.config.errors import ConfigError

if TYPE_CHECKING:
    from neobert_pt.config.schema import PhaseConfig, RunConfig

__all__ = ["length_keys", "validate_phases"]


def length_keys(p: PhaseConfig) -> list[str]:
    """Which of steps / tokens / until_step the phase sets (one, or none for an open-ended last phase)."""
    return [k for k in ("steps", "tokens", "until_step") if getattr(p, k) is not None]


def validate_phases(run: RunConfig) -> None:
    """Checks that need no world size; raises ConfigError naming ``phases[i].key``."""
    phases = run.phases
    names: dict[str, int] = {}
    known_end: int | None = 0  # end of the previous phase when it is known without the world size
    for i, p in enumerate(phases):
        at = f"phases[{i}]"
        keys = length_keys(p)
        last = i == len(phases) - 1
        if len(keys) > 1:
            raise ConfigError(f"{at} sets {' and '.join(keys)}; give its length one way only.")
        if not keys and not last:
            raise ConfigError(f"{at} has no length: set {at}.steps, .tokens or .until_step (only the last phase "
                              "may leave it out to run until trainer.max_steps).")
        for key in ("steps", "tokens", "until_step"):
            value = getattr(p, key)
            if value is not None and value < 1:
                raise ConfigError(f"{at}.{key} must be >= 1 (a phase cannot be empty), got {value}.")
        if p.until_step is not None and known_end is not None and p.until_step <= known_end:
            raise ConfigError(
                f"{at}.until_step={p.until_step} overlaps the previous phases, which already run to step {known_end}; "
                "phases run back to back, so until_step must grow from phase to phase."
            )
        if p.steps is not None and known_end is not None:
            known_end += p.steps
        elif p.until_step is not None:
            known_end = p.until_step
        else:
            known_end = None
        name = p.name if p.name is not None else f"phase{i}"
        if name in names:
            raise ConfigError(f"{at}.name {name!r} is already the name of phases[{names[name]}]; names must differ.")
        names[name] = i
        if p.max_seq_length is not None:
            if p.max_seq_length < 2:
                raise ConfigError(f"{at}.max_seq_length must be >= 2, got {p.max_seq_length}.")
            if p.max_seq_length > run.model.max_position_embeddings:
                raise ConfigError(
                    f"{at}.max_seq_length ({p.max_seq_length}) exceeds model.max_position_embeddings "
                    f"({run.model.max_position_embeddings}); raise model.max_position_embeddings or shorten the phase's rows."
                )
        if p.rope_theta is not None and not p.rope_theta > 0:
            raise ConfigError(f"{at}.rope_theta must be > 0, got {p.rope_theta}.")
        for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):
            value = getattr(p, key)
            if value is not None and value < 1:
                raise ConfigError(f"{at}.{key} must be >= 1, got {value}.")
        _validate_batch_warmup(run, p, at)
        _validate_mlm(p, at)
        _validate_lr(p, at)
    max_steps = run.trainer.max_steps
    if known_end is not None and length_keys(phases[-1]) and max_steps != "auto" and max_steps != known_end:
        raise ConfigError(
            f"trainer.max_steps is {max_steps} but the phases add up to {known_end} steps; set trainer.max_steps to "
            f"auto (or {known_end}), or leave the last phase's length out so it runs until trainer.max_steps."
        )


def _validate_batch_warmup(run: RunConfig, p: PhaseConfig, at: str) -> None:
    if p.batch_warmup_steps < 0:
        raise ConfigError(f"{at}.batch_warmup_steps must be >= 0, got {p.batch_warmup_steps}.")
    if p.batch_warmup_tokens is not None and p.batch_warmup_tokens < 1:
        raise ConfigError(f"{at}.batch_warmup_tokens must be >= 1 or null, got {p.batch_warmup_tokens}.")
    if p.batch_warmup_steps and p.batch_warmup_tokens:
        raise ConfigError(f"{at} sets batch_warmup_steps and batch_warmup_tokens; give the warmup's length one way.")
    final = p.gradient_accumulation_steps or run.trainer.gradient_accumulation_steps
    if (p.batch_warmup_steps or p.batch_warmup_tokens) and not 1 <= p.batch_warmup_start_accumulation <= final:
        raise ConfigError(
            f"{at}.batch_warmup_start_accumulation must be in [1, {final}] (the phase's gradient_accumulation_steps), "
            f"got {p.batch_warmup_start_accumulation}."
        )


def _validate_mlm(p: PhaseConfig, at: str) -> None:
    rates = {"mlm_probability": p.mlm_probability, "mlm_probability_end": p.mlm_probability_end}
    rates.update({f"mlm_values[{j}]": v for j, v in enumerate(p.mlm_values)})
    for key, value in rates.items():
        if value is not None and not 0.0 < value < 1.0:
            raise ConfigError(
                f"{at}.{key} = {value} leaves the masking rate range (0, 1); every rate of the schedule must be "
                "strictly between 0 and 1."
            )
    if p.mlm_schedule in ("linear", "cosine") and p.mlm_probability_end is None:
        raise ConfigError(f"{at}.mlm_schedule {p.mlm_schedule!r} needs {at}.mlm_probability_end (the rate at the "
                          "phase's last step).")
    if p.mlm_schedule == "step" and not p.mlm_values:
        raise ConfigError(f"{at}.mlm_schedule 'step' needs {at}.mlm_values, e.g. [0.3, 0.2, 0.15].")
    if p.mlm_schedule != "step" and p.mlm_values:
        raise ConfigError(f"{at}.mlm_values is only read by mlm_schedule 'step' (the phase uses {p.mlm_schedule!r}).")
    if p.mlm_schedule in ("constant", "step") and p.mlm_probability_end is not None:
        raise ConfigError(f"{at}.mlm_probability_end is only read by the linear and cosine schedules.")


def _validate_lr(p: PhaseConfig, at: str) -> None:
    checks = (("lr_warmup_steps", p.lr_warmup_steps >= 0, ">= 0"), ("lr_peak", p.lr_peak > 0, "> 0"),
              ("lr_end", p.lr_end >= 0, ">= 0"),
              ("lr_decay_steps", p.lr_decay_steps is None or p.lr_decay_steps >= 1, ">= 1 or null"))
    for key, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"{at}.{key} must be {allowed}, got {getattr(p, key)}.")
