"""Learning-rate schedule: linear warmup, then cosine / linear / constant / warmup-stable-decay.

The schedule is one pure function, :func:`lr_factor`, of the optimizer step (the number of updates already done)
and the run length. The torch scheduler is a ``LambdaLR`` over it, so every param group's ``initial_lr`` (its peak
LR, see docs/contracts.md) is multiplied by the same factor, and resuming restores only ``last_epoch``.

Resuming with a larger ``trainer.max_steps``: the factor is recomputed for the new horizon, so the steps already
taken are unchanged and from the resume step on the LR follows the *new* run's curve (warmup is over; a cosine or
linear decay is stretched to end at the new ``max_steps``; ``constant`` and the stable phase of ``wsd`` continue
without any jump). The LR at the resume step is logged so the change is visible.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from neobert_pt.config.schema import SchedulerConfig
from neobert_pt.train.phases import Phase, lr_factor_at

logger = logging.getLogger(__name__)

SCHEDULES = ("cosine", "linear", "constant", "wsd")


def effective_warmup(warmup_steps: int, max_steps: int) -> int:
    """Warmup actually used: a warmup as long as the run would never reach the peak, so it is clamped."""
    if max_steps <= 1:
        return 0
    return min(max(warmup_steps, 0), max_steps - 1)


def lr_factor(
    step: int,
    *,
    name: str,
    warmup_steps: int,
    max_steps: int,
    min_lr_ratio: float = 0.0,
    decay_steps: int | None = None,
) -> float:
    """Multiplier of the peak LR for the update with index ``step`` (0-based).

    1. warmup (``step < warmup``): ``(step + 1) / warmup`` — the first update is not wasted at LR 0 and the last
       warmup update runs at the peak;
    2. ``constant``: 1;
    3. ``cosine`` / ``linear``: from 1 right after warmup down to ``min_lr_ratio`` at the last update
       (``step = max_steps - 1``);
    4. ``wsd``: 1 until the final ``decay_steps`` updates (default 10% of the run), then linear to ``min_lr_ratio``.
    Steps past ``max_steps - 1`` keep the final value.
    """
    if name not in SCHEDULES:
        raise ValueError(f"scheduler.name={name!r} is not one of {', '.join(SCHEDULES)}")
    warmup = effective_warmup(warmup_steps, max_steps)
    if step < warmup:
        return (step + 1) / warmup
    if name == "constant":
        return 1.0
    last = max_steps - 1
    if name == "wsd":
        n_decay = decay_steps if decay_steps is not None else max(1, round(0.1 * max_steps))
        n_decay = min(max(n_decay, 1), max_steps - warmup)
        start = last - n_decay + 1  # first decaying update; the last update lands exactly on min_lr_ratio
        if step < start:
            return 1.0
        progress = min(1.0, (step - start + 1) / n_decay)
        return 1.0 - (1.0 - min_lr_ratio) * progress
    span = last - warmup
    progress = 1.0 if span <= 0 else min(1.0, (step - warmup) / span)
    if name == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, max_steps: int,
                    plan: list[Phase] | None = None) -> LambdaLR:
    """A ``LambdaLR`` over :func:`lr_factor`; warns once when the warmup had to be clamped.

    With phases (``plan``), :func:`neobert_pt.train.phases.lr_factor_at` picks per phase between this schedule over
    the whole run and the phase's own LR segment.
    """
    warmup = effective_warmup(cfg.warmup_steps, max_steps)
    if warmup != cfg.warmup_steps:
        logger.warning(
            "scheduler.warmup_steps=%d does not fit in trainer.max_steps=%d; using a warmup of %d steps",
            cfg.warmup_steps, max_steps, warmup,
        )
    fn = functools.partial(
        lr_factor,
        name=cfg.name,
        warmup_steps=cfg.warmup_steps,
        max_steps=max_steps,
        min_lr_ratio=cfg.min_lr_ratio,
        decay_steps=cfg.decay_steps,
    )
    if plan:
        fn = functools.partial(lr_factor_at, plan, run_factor=fn)
    return LambdaLR(optimizer, fn)
