"""Peak-LR power laws from the DANA paper, behind ``optimizer.lr: auto``.

``lr* = a * (b + P) ** d`` with P the non-embedding parameter count. The coefficients are the paper's "Enoki" fits
(`src/config/scaling_rules.yaml` in mlexpos/adana): decoder-only GPT models, Chinchilla length (20 tokens per
parameter), warmup T/50 from 1% then cosine to 10% of peak, grad-norm clip 0.5. They are keyed by
(optimizer, kappa, batch) because the optimum moves with kappa and with tokens per step. Two batch sizes were fitted:
32 x 2048 = 65,536 tokens/step and 512 x 2048 = 1,048,576; between them the LR is interpolated geometrically in
log(tokens/step), outside them the nearest fit is used. An MLM encoder is not a decoder LM, so treat the value as the
centre of a x{0.5, 1, 2} sweep, not as a tuned optimum. Each optimizer's fits are part of its catalog entry
(``lr_fits`` of ``register_optimizer``; the built-in ones are in ``neobert_pt/optim/config.py``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

from torch import nn

from neobert_pt.errors import ConfigError
from neobert_pt.optim.catalog import LARGE_BATCH_TOKENS, SMALL_BATCH_TOKENS, LrFits, optimizer_entries
from neobert_pt.optim.config import OptimizerConfig
from neobert_pt.optim.param_groups import group_parameters

logger = logging.getLogger(__name__)


def _lr_fits(optimizer_name: str) -> LrFits:
    """The catalog's fits of ``optimizer_name``; empty for an optimizer without a rule (or an unknown name)."""
    entry = next((e for e in optimizer_entries() if e.name == optimizer_name), None)
    return (entry.lr_fits if entry is not None else None) or {}


def _kappa_free(optimizer_name: str) -> bool:
    return None in _lr_fits(optimizer_name)


def _fits_for(optimizer_name: str, kappa: float) -> Mapping[int, tuple[float, float, float]]:
    by_kappa = _lr_fits(optimizer_name)
    if None in by_kappa:
        return by_kappa[None]
    kappas = sorted(k for k in by_kappa if k is not None)
    if not kappas:
        supported = sorted(e.name for e in optimizer_entries() if e.lr_fits)
        raise ConfigError(
            f"optimizer.lr=auto has no LR rule for optimizer {optimizer_name!r} (rules exist for: "
            f"{', '.join(supported)}); set optimizer.lr to a number, e.g. --optimizer.lr 1e-3."
        )
    for k in kappas:
        if math.isclose(k, kappa, abs_tol=1e-9):
            return by_kappa[k]
    raise ConfigError(
        f"optimizer.lr=auto: {optimizer_name} has LR fits only for kappa in {kappas}, not "
        f"optimizer.dana_config.kappa={kappa}; use one of those kappas or set optimizer.lr to a number."
    )


def suggest_peak_lr(
    optimizer_name: str, non_embedding_params: int, *, kappa: float = 0.85, tokens_per_step: int | None = None
) -> float:
    """Peak LR ``a * (b + P) ** d`` for ``optimizer_name`` at P non-embedding parameters.

    ``tokens_per_step=None`` uses the 65,536-token fit. Otherwise, when both batch fits exist, the two LRs are
    interpolated geometrically in log(tokens_per_step) (clamped to the fitted range); with one fit it is used as is.
    """
    if non_embedding_params <= 0:
        raise ValueError(f"non_embedding_params must be > 0, got {non_embedding_params}")
    fits = _fits_for(optimizer_name, kappa)

    def power_law(tokens: int) -> float:
        a, b, d = fits[tokens]
        return a * (b + non_embedding_params) ** d

    if tokens_per_step is None or len(fits) == 1:
        return power_law(min(fits))
    w = math.log(tokens_per_step / SMALL_BATCH_TOKENS) / math.log(LARGE_BATCH_TOKENS / SMALL_BATCH_TOKENS)
    if w <= 0.0:
        return power_law(SMALL_BATCH_TOKENS)
    if w >= 1.0:
        return power_law(LARGE_BATCH_TOKENS)
    return math.exp((1.0 - w) * math.log(power_law(SMALL_BATCH_TOKENS)) + w * math.log(power_law(LARGE_BATCH_TOKENS)))


def count_non_embedding_params(model: nn.Module) -> int:
    """Parameters of the hidden 2-D block weights (param groups of kind ``matrix``).

    This is what the fits count as 12 * d_model^2 * n_layers (attention 4d^2 + MLP 8d^2, no embeddings, norms or
    biases); for the NeoBERT recipes (SwiGLU width 2/3 * 4d) it is exactly that number. Counting from the model
    also covers GELU or non-standard FFN widths. Works on FSDP2 models (DTensor ``numel`` is the global size).
    """
    return sum(g.numel for g in group_parameters(model) if g.kind == "matrix")


def resolve_lr(cfg: OptimizerConfig, model: nn.Module, tokens_per_step: int) -> float:
    """``optimizer.lr`` as a number: itself, or the power-law value when it is ``'auto'`` (logged with its inputs)."""
    if cfg.lr != "auto":
        return float(cfg.lr)
    kappa = cfg.dana_config.kappa
    params = count_non_embedding_params(model)
    lr = suggest_peak_lr(cfg.name, params, kappa=kappa, tokens_per_step=tokens_per_step)
    kappa_note = "" if _kappa_free(cfg.name) else f" kappa={kappa}"
    logger.info(
        "optimizer.lr=auto -> %.3g (%s%s, %d non-embedding params, %d tokens/step; DANA-paper decoder-LM fit, "
        "a starting point for a x0.5/x1/x2 sweep)",
        lr, cfg.name, kappa_note, params, tokens_per_step,
    )
    return lr
