"""Resolve the ``auto`` numbers of a run config: ``trainer.max_steps`` and ``optimizer.lr``.

``trainer.max_steps: auto``
    with phases that all have a length: their total; otherwise ``ceil(trainer.tokens_per_param * P / tokens per
    step)`` with P the non-embedding parameter count (the count the DANA LR fits use, 12 * d^2 * L for the NeoBERT
    recipes) and tokens per step = rows per step (all processes) x sequence length. 20 tokens per parameter is the
    Chinchilla rule for decoder LMs: a starting point for an encoder, not a tuned optimum. With phases whose last
    one has no length, the earlier phases spend their tokens and the last runs until the budget is reached.
``optimizer.lr: auto``
    the DANA power law (:mod:`neobert_pt.optim.lr_rule`) at the same P and the tokens per step of the first phase
    (of the run without phases).

Both are resolved once, before anything is written, so ``config.yaml`` records numbers and a resume reads the same
numbers back. P is counted on a meta-device model (no memory, no init), identical to the real model's count.
"""

from __future__ import annotations

import copy
import logging
import math

import torch

from neobert_pt.config.errors import ConfigError
from neobert_pt.config.schema import RunConfig
from neobert_pt.train import phases as phase_rules

logger = logging.getLogger(__name__)

_PLACEHOLDER_VOCAB = 30522  # the embedding is not counted in P; any vocab gives the same count


def meta_model(run: RunConfig) -> torch.nn.Module:
    """The configured model on the meta device (shapes only)."""
    from neobert_pt.modeling import NeoBERTForMaskedLM

    vocab = run.model.vocab_size or _PLACEHOLDER_VOCAB
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # never moves the run's RNG streams
        return NeoBERTForMaskedLM(run.model.neobert_config(vocab_size=vocab))


def non_embedding_params(run: RunConfig) -> int:
    from neobert_pt.optim.lr_rule import count_non_embedding_params

    return count_non_embedding_params(meta_model(run))


def tokens_per_step(run: RunConfig, world_size: int) -> int:
    """Tokens per optimizer step of the run's first phase (or of the run without phases)."""
    if run.phases:
        first = phase_rules.phase_settings(run, 0, run.phases[0], 0, 0, world_size)
        return (first.per_device_train_batch_size * first.gradient_accumulation_steps * world_size
                * first.max_seq_length)
    t = run.trainer
    return t.per_device_train_batch_size * t.gradient_accumulation_steps * world_size * run.dataset.max_seq_length


def _head(run: RunConfig, n: int) -> RunConfig:
    out = copy.copy(run)  # shallow, without re-validation: only ``phases`` differs
    out.phases = run.phases[:n]
    return out


def resolve_auto(run: RunConfig, world_size: int) -> dict[str, str]:
    """Replace ``auto`` values of ``run`` in place by numbers; returns ``{dotted key: how it was derived}``."""
    notes: dict[str, str] = {}
    params: int | None = None
    if run.trainer.max_steps == "auto":
        total = phase_rules.fixed_total_steps(run, world_size)
        if total is not None:
            run.trainer.max_steps = total
            notes["trainer.max_steps"] = f"auto: sum of the {len(run.phases)} phases' lengths"
        else:
            params = non_embedding_params(run)
            budget = math.ceil(run.trainer.tokens_per_param * params)
            run.trainer.max_steps = _steps_for_budget(run, world_size, budget)
            notes["trainer.max_steps"] = (
                f"auto: {run.trainer.tokens_per_param:g} tokens/param x {params:,} non-embedding params = "
                f"{budget:,} tokens at {world_size} process(es)"
            )
    if run.optimizer.lr == "auto":
        from neobert_pt.optim.lr_rule import resolve_lr

        tps = tokens_per_step(run, world_size)
        run.optimizer.lr = resolve_lr(run.optimizer, meta_model(run), tps)
        params = params if params is not None else non_embedding_params(run)
        notes["optimizer.lr"] = (f"auto: DANA power law for {run.optimizer.name} at {params:,} non-embedding params, "
                                 f"{tps:,} tokens/step")
    if run.phases:  # lengths in tokens or until_step that cannot work at this world size fail here, with one line
        phase_rules.build_plan(run, world_size, max_steps=run.trainer.max_steps)
    return notes


def _steps_for_budget(run: RunConfig, world_size: int, budget: int) -> int:
    if not run.phases:
        return max(1, math.ceil(budget / tokens_per_step(run, world_size)))
    head = phase_rules.build_plan(_head(run, len(run.phases) - 1), world_size, max_steps=None)
    used = sum(phase_rules.tokens_for_steps(p, p.length, world_size) for p in head)
    start = head[-1].end if head else 0
    if used >= budget:
        raise ConfigError(
            f"trainer.max_steps=auto: the phases before the last already use {used:,} tokens, the whole budget of "
            f"{budget:,} (trainer.tokens_per_param x parameters); shorten them or raise trainer.tokens_per_param."
        )
    last = phase_rules.phase_settings(run, len(run.phases) - 1, run.phases[-1], start, start, world_size)
    return start + phase_rules.steps_for_tokens(last, budget - used, world_size)
