"""Training phases: which phase a step belongs to and what it runs with, as pure functions of config and step.

A run with ``phases`` is a sequence of contiguous step ranges. Phase ``p`` covers the updates with 0-based index
``start <= s < end`` (``s`` = optimizer steps already done when the update starts, i.e. ``TrainState.step``). Each
phase may change, from its first update on:

- ``max_seq_length`` (the data is re-packed at the new length, see :func:`continue_position`),
- ``rope_theta`` (the trainer rebuilds the rotary frequencies),
- ``per_device_train_batch_size`` / ``gradient_accumulation_steps``, with a batch-size warmup that ramps the
  accumulation (:func:`accumulation_at`) — the trainer's global masked-token normaliser keeps every step an exact
  token mean whatever the number of micro-batches,
- the masking rate, constant or scheduled within the phase (:func:`mlm_probability_at`),
- the LR: the run's ``scheduler`` over the whole run, or the phase's own warmup-stable-decay segment
  (:func:`lr_factor_at`), which starts from the factor the previous update used so segments compose.

Everything here depends only on the config, the world size and the step, so a resumed run recomputes exactly what
an uninterrupted one used. :func:`neobert_pt.config.phases.validate_phases` runs at config load (one clear line per problem);
:func:`build_plan` turns lengths in tokens into steps once the world size is known.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from neobert_pt.config.errors import ConfigError
from neobert_pt.config.phases import length_keys

if TYPE_CHECKING:
    from neobert_pt.config.schema import PhaseConfig, RunConfig

__all__ = [
    "Phase",
    "accumulation_at",
    "build_plan",
    "continue_position",
    "describe_plan",
    "fixed_total_steps",
    "lr_factor_at",
    "mlm_probability_at",
    "phase_at",
    "phase_run",
    "phase_settings",
    "steps_for_tokens",
    "tokens_for_steps",
]


@dataclass(frozen=True)
class Phase:
    """One resolved phase: its step range and the settings it runs with (run values where it sets none)."""

    index: int
    name: str
    start: int  # updates done before its first update
    end: int  # updates done after its last update
    max_seq_length: int
    rope_theta: float
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    mlm_probability: float
    ramp: tuple[int, ...]  # micro-batches of each batch-warmup update; gradient_accumulation_steps after them
    cfg: PhaseConfig

    @property
    def length(self) -> int:
        return self.end - self.start


# ---------------------------------------------------------------------------------------------------------------
# Validation and planning


def phase_settings(run: RunConfig, i: int, p: PhaseConfig, start: int, end: int, world_size: int) -> Phase:
    """Phase ``i`` over ``[start, end)`` with the run's values where it sets none."""
    mlm = p.mlm_values[0] if p.mlm_schedule == "step" else p.mlm_probability
    seq = p.max_seq_length or run.dataset.max_seq_length
    rows = p.per_device_train_batch_size or run.trainer.per_device_train_batch_size
    accumulation = p.gradient_accumulation_steps or run.trainer.gradient_accumulation_steps
    return Phase(
        index=i, name=p.name if p.name is not None else f"phase{i}", start=start, end=end, max_seq_length=seq,
        rope_theta=p.rope_theta if p.rope_theta is not None else run.model.rope_theta,
        per_device_train_batch_size=rows, gradient_accumulation_steps=accumulation,
        mlm_probability=mlm if mlm is not None else run.datacollator.mlm_probability,
        ramp=_batch_ramp(p, accumulation, rows * world_size * seq), cfg=p,
    )


def _batch_ramp(p: PhaseConfig, final: int, tokens_per_micro_batch: int) -> tuple[int, ...]:
    """Micro-batches per warmup update, rising linearly from batch_warmup_start_accumulation to ``final`` in the
    warmup's steps (batch_warmup_steps) or in the tokens it has consumed (batch_warmup_tokens)."""
    first = p.batch_warmup_start_accumulation
    if p.batch_warmup_tokens:
        ramp, seen = [], 0
        while seen < p.batch_warmup_tokens:
            ramp.append(first + (final - first) * seen // p.batch_warmup_tokens)
            seen += ramp[-1] * tokens_per_micro_batch
        return tuple(ramp)
    return tuple(first + (final - first) * i // p.batch_warmup_steps for i in range(p.batch_warmup_steps))


def tokens_for_steps(phase: Phase, steps: int, world_size: int) -> int:
    """Token capacity (rows x sequence length, all processes) of the phase's first ``steps`` updates."""
    per_micro = phase.per_device_train_batch_size * world_size * phase.max_seq_length
    warm = min(steps, len(phase.ramp))
    return per_micro * (sum(phase.ramp[:warm]) + (steps - warm) * phase.gradient_accumulation_steps)


def steps_for_tokens(phase: Phase, tokens: int, world_size: int) -> int:
    """Fewest updates of ``phase`` whose token capacity reaches ``tokens``."""
    per_micro = phase.per_device_train_batch_size * world_size * phase.max_seq_length
    done = 0
    for i, micro in enumerate(phase.ramp):
        if done >= tokens:
            return i
        done += per_micro * micro
    if done >= tokens:
        return len(phase.ramp)
    per_step = per_micro * phase.gradient_accumulation_steps
    return len(phase.ramp) + math.ceil((tokens - done) / per_step)


def fixed_total_steps(run: RunConfig, world_size: int) -> int | None:
    """Total steps when every phase has a length, else None (the last phase runs until trainer.max_steps)."""
    if not run.phases or not length_keys(run.phases[-1]):
        return None
    return build_plan(run, world_size, max_steps=None)[-1].end


def build_plan(run: RunConfig, world_size: int, max_steps: int | None) -> list[Phase]:
    """The resolved phases (empty without ``phases``); ``max_steps`` ends a last phase that has no length."""
    plan: list[Phase] = []
    start = 0
    for i, p in enumerate(run.phases):
        probe = phase_settings(run, i, p, start, start, world_size)
        if p.steps is not None:
            end = start + p.steps
        elif p.tokens is not None:
            end = start + steps_for_tokens(probe, p.tokens, world_size)
        elif p.until_step is not None:
            end = p.until_step
        else:
            if max_steps is None:
                raise ConfigError(f"phases[{i}] has no length and trainer.max_steps is not resolved yet.")
            end = max_steps
        if end <= start:
            what = f"until_step={p.until_step}" if p.until_step is not None else f"trainer.max_steps={end}"
            raise ConfigError(f"phases[{i}] would be empty or overlap the phases before it: {what}, but they already "
                              f"run to step {start}; give it a later end.")
        plan.append(phase_settings(run, i, p, start, end, world_size))
        start = end
    return plan


def describe_plan(plan: list[Phase], world_size: int) -> list[str]:
    """One line per phase: step range, rows, tokens per step, RoPE base, masking and LR (logs, --print-config)."""
    lines = []
    for p in plan:
        c = p.cfg
        warm = (f", accumulation {c.batch_warmup_start_accumulation}->{p.gradient_accumulation_steps} over "
                f"{len(p.ramp)} steps" if p.ramp else "")
        if c.mlm_schedule == "constant":
            mlm = f"{p.mlm_probability:g}"
        elif c.mlm_schedule == "step":
            mlm = "step " + "/".join(f"{v:g}" for v in c.mlm_values)
        else:
            mlm = f"{c.mlm_schedule} {p.mlm_probability:g}->{c.mlm_probability_end:g}"
        lr = "run schedule" if c.lr_schedule == "run" else (
            f"segment warmup {c.lr_warmup_steps}, peak {c.lr_peak:g}" + (
                f", {c.lr_decay} decay to {c.lr_end:g}" if c.lr_decay != "none" else ""))
        tokens = p.per_device_train_batch_size * p.gradient_accumulation_steps * world_size * p.max_seq_length
        lines.append(
            f"phase {p.index} {p.name}: steps {p.start + 1}-{p.end} ({p.length}), {p.max_seq_length} tokens/row x "
            f"{p.per_device_train_batch_size} rows x {p.gradient_accumulation_steps} accumulation x {world_size} "
            f"process(es) = {tokens:,} tokens/step{warm}; rope_theta {p.rope_theta:g}; masking {mlm}; lr {lr}"
        )
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Per-step settings


def phase_at(plan: list[Phase], step: int) -> Phase:
    """The phase of the update with 0-based index ``step`` (past the end: the last phase)."""
    for phase in plan:
        if step < phase.end:
            return phase
    return plan[-1]


def _progress(phase: Phase, step: int) -> float:
    """0 at the phase's first update, 1 at its last."""
    return min(1.0, max(0.0, (step - phase.start) / max(1, phase.length - 1)))


def mlm_probability_at(phase: Phase, step: int) -> float:
    """Masking rate of update ``step`` inside ``phase``."""
    p = phase.cfg
    if p.mlm_schedule == "constant":
        return phase.mlm_probability
    if p.mlm_schedule == "step":
        k = len(p.mlm_values)
        return p.mlm_values[min(k - 1, (step - phase.start) * k // max(1, phase.length))]
    t, a, b = _progress(phase, step), phase.mlm_probability, p.mlm_probability_end
    assert b is not None  # validated
    if p.mlm_schedule == "linear":
        return a + (b - a) * t
    return b + (a - b) * 0.5 * (1.0 + math.cos(math.pi * t))


def accumulation_at(phase: Phase, step: int) -> int:
    """Micro-batches of update ``step``: ramps from the warmup start to the phase's accumulation, then holds."""
    i = step - phase.start
    return phase.ramp[i] if 0 <= i < len(phase.ramp) else phase.gradient_accumulation_steps


def lr_factor_at(plan: list[Phase], step: int, run_factor: Callable[[int], float]) -> float:
    """Multiplier of the peak LR for update ``step``: ``run_factor`` (the scheduler section) or the phase's segment.

    A segment warms up linearly from the factor of the update before it (0 at the run's start) to ``lr_peak``, holds,
    and decays over its last ``lr_decay_steps`` updates to ``lr_end`` (the phase's last update lands on it).
    """
    phase = phase_at(plan, step)
    p = phase.cfg
    if p.lr_schedule == "run":
        return run_factor(step)
    i = step - phase.start
    if i < p.lr_warmup_steps:
        before = 0.0 if phase.start == 0 else lr_factor_at(plan, phase.start - 1, run_factor)
        return before + (p.lr_peak - before) * (i + 1) / p.lr_warmup_steps
    if p.lr_decay == "none":
        return p.lr_peak
    after_warmup = max(1, phase.length - p.lr_warmup_steps)
    n_decay = min(max(p.lr_decay_steps or after_warmup, 1), after_warmup)
    first = phase.length - n_decay
    if i < first:
        return p.lr_peak
    progress = min(1.0, (i - first + 1) / n_decay)
    if p.lr_decay == "linear":
        shape = 1.0 - progress
    elif p.lr_decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # "1-sqrt" (ModernBERT's decay)
        shape = 1.0 - math.sqrt(progress)
    return p.lr_end + (p.lr_peak - p.lr_end) * shape


# ---------------------------------------------------------------------------------------------------------------
# Entering a phase


def phase_run(run: RunConfig, phase: Phase) -> RunConfig:
    """A copy of ``run`` with the phase's data, batch, masking and RoPE settings (what its data is built from)."""
    out = copy.deepcopy(run)
    out.dataset.max_seq_length = phase.max_seq_length
    out.trainer.per_device_train_batch_size = phase.per_device_train_batch_size
    out.trainer.gradient_accumulation_steps = phase.gradient_accumulation_steps
    out.datacollator.mlm_probability = phase.mlm_probability
    out.model.rope_theta = phase.rope_theta
    return out


def continue_position(old: dict[str, Any], old_seq_len: int, new: dict[str, Any], new_seq_len: int
                      ) -> dict[str, Any]:
    """The new phase's loader position that continues where the old phase's loader stopped.

    Rows are re-packed at the new sequence length, so the position carries over as tokens: map-style, the token
    offset into the current epoch (the new loader starts at the first global micro-batch at or after it in the
    epoch's permutation of the re-packed rows, or at the next epoch if none is left); streams and mixtures, the
    tokens consumed since the start. Deterministic, so an uninterrupted run and a run resumed from the boundary
    checkpoint agree exactly. ``old``/``new`` are loader ``state_dict()``s; returns ``new`` with the position filled.
    """
    out = dict(new)
    new_global = new["batch_size"] * new["world_size"]
    if old["kind"] != new["kind"]:
        raise ValueError(f"cannot continue a {old['kind']} loader with a {new['kind']} loader")
    if old["kind"] == "map":
        epoch, in_epoch = divmod(old["rows_consumed"], old["rows_per_epoch"])
        rows = -(-in_epoch * old_seq_len // (new_global * new_seq_len)) * new_global
        if rows >= new["rows_per_epoch"]:
            epoch, rows = epoch + 1, 0
        out["rows_consumed"] = epoch * new["rows_per_epoch"] + rows
    else:
        out["rows_consumed"] = -(-old["rows_consumed"] * old_seq_len // (new_global * new_seq_len)) * new_global
    return out
