"""The `optimizer` config section, the built-in optimizers' sub-blocks (`muon_config`, `dion2_config`, `dion_config`,
`dana_config`) and the catalog entry of every built-in optimizer.

Torch-free (stdlib, the leaf modules ``neobert_pt/errors.py`` / ``neobert_pt/fields.py`` and the catalog), so
``neobert_pt/config/schema.py`` imports it without importing an optimizer. Top-level `lr`, `betas`, `eps` and
`weight_decay` serve AdamW and the scalar (embedding/norm) group of every orthonormal optimizer; each sub-block holds
only what its algorithm adds. A sub-block given for an optimizer that is not selected is ignored with a warning (see
:func:`neobert_pt.config.loader.load_config`). :data:`OptimizerConfig` is built from the catalog at the end of this
module (``neobert_pt/optim/catalog.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from neobert_pt.errors import ConfigError
from neobert_pt.fields import option
from neobert_pt.optim.catalog import LARGE_BATCH_TOKENS, SMALL_BATCH_TOKENS, optimizer_section, register_optimizer


def _validate(section: str, obj: object, checks: tuple[tuple[str, bool, str], ...]) -> None:
    """Raise a ConfigError naming the first failing ``(key, ok, allowed)`` check of ``optimizer.<section>``."""
    for key, ok, allowed in checks:
        if not ok:
            raise ConfigError(
                f"optimizer.{section}.{key}={getattr(obj, key)!r} is invalid: must be {allowed}; "
                f"set --optimizer.{section}.{key} to a valid value."
            )


@dataclass
class QKClipSettings:
    """QK-clip (Kimi K2) settings, shared by ``muon_config`` and ``dion2_config`` (one component: qk_clip.py)."""

    enable_clipping: bool = option(False, "Apply QK-clip after optimizer steps.")
    clipping_threshold: float = option(50.0, "QK-clip threshold tau on the per-head max attention logit.")
    clipping_alpha: float = option(0.5, "Split of the clip factor: eta**alpha on W_q rows, eta**(1-alpha) on W_k.")
    clipping_interval: int = option(10, "Clip every N optimizer steps.")
    clipping_warmup_steps: int = option(0, "No clipping before this optimizer step.")
    clipping_statistic: Literal["max", "mean"] = option(
        "max", "Per-head statistic over the batch: 'max' (Kimi K2) or 'mean' of per-sequence maxima (fork parity)."
    )

    def _clip_checks(self) -> tuple[tuple[str, bool, str], ...]:
        return (
            ("clipping_threshold", self.clipping_threshold > 0, "> 0"),
            ("clipping_alpha", 0 <= self.clipping_alpha <= 1, "in [0, 1]"),
            ("clipping_interval", self.clipping_interval >= 1, ">= 1"),
            ("clipping_warmup_steps", self.clipping_warmup_steps >= 0, ">= 0"),
        )


@dataclass
class MuonConfig(QKClipSettings):
    """MuonClip: Muon on the encoder's hidden matrices + AdamW on the rest, with optional QK-clip.

    The fork's names ``muon_beta``/``muon_decay`` are ``momentum``/``weight_decay`` here. ``ns_steps`` applies only to
    ``newton_schulz_kj``: Polar Express and NS5 are fixed 5-step schedules with per-step coefficients.
    """

    momentum: float = option(0.95, "Muon momentum mu.")
    nesterov: bool = option(True, "Orthogonalise G + mu*M (Nesterov) instead of M.")
    muon_lr: float | None = option(None, "Peak LR of the Muon (matrix) group; null: optimizer.lr.")
    adam_lr: float | None = option(None, "Peak LR of the AdamW (embedding/norm) group; null: optimizer.lr.")
    weight_decay: float | None = option(None, "Decoupled weight decay of the matrix group; null: optimizer.weight_decay.")
    ns_steps: int = option(5, "Iterations of the orthogonaliser.")
    orthogonalization: Literal["polar_express", "newton_schulz", "newton_schulz_kj"] = option(
        "polar_express", "Orthogonaliser: Polar Express (5 steps), quintic NS5, or Keller Jordan's fixed-coefficient NS."
    )
    adjust_lr: Literal["rms_norm", "spectral_norm", "none"] = option(
        "rms_norm", "Update scale: 'rms_norm' = 0.2*sqrt(max(m,n)) (Moonlight, AdamW-RMS matching), "
        "'spectral_norm' = sqrt(m/n), 'none'."
    )
    enable_clipping: bool = option(True, "Apply QK-clip after optimizer steps (on by default for muonclip).")
    fast_cpu_orthogonalization: bool = option(
        False, "Opt-in CPU speed path: bf16 orthogonaliser products as fp32 sgemm rounded once. Not upstream's bits "
        "(a different, equally accurate approximation; divergence table in docs/optimizers.md); default: exact."
    )

    def __post_init__(self) -> None:
        checks = (
            ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
            ("muon_lr", self.muon_lr is None or self.muon_lr > 0, "> 0 or null"),
            ("adam_lr", self.adam_lr is None or self.adam_lr > 0, "> 0 or null"),
            ("weight_decay", self.weight_decay is None or self.weight_decay >= 0, ">= 0 or null"),
            ("ns_steps", 1 <= self.ns_steps <= 20, "in [1, 20]"),
            ("ns_steps", self.ns_steps == 5 or self.orthogonalization == "newton_schulz_kj",
             "5 unless orthogonalization is newton_schulz_kj (polar_express and newton_schulz are fixed 5-step)"),
            *self._clip_checks(),
        )
        _validate("muon_config", self, checks)


@dataclass
class Dion2Config(QKClipSettings):
    """Dion2: sparse (top-fraction rows) orthonormal updates with error feedback, + optional QK-clip."""

    fraction: float = option(0.25, "Fraction of rows (or columns) selected and orthogonalised per step.")
    ef_decay: float = option(0.95, "Error-feedback decay applied to the selected slices.")
    adjust_lr: Literal["spectral_norm", "rms_norm", "none"] = option(
        "rms_norm", "Shape-dependent LR scale from the full matrix shape: 'rms_norm' = 0.2*sqrt(max(m,n)) (Moonlight: "
        "update RMS 0.2*lr on the selected rows), 'spectral_norm' = sqrt(m/n) (upstream default; 10-15x smaller "
        "steps than AdamW at hidden 768), 'none'."
    )
    orthogonalization: Literal["polar_express", "newton_schulz"] = option(
        "polar_express", "Orthogonaliser of the selected submatrix (Polar Express 5 steps, or quintic NS5)."
    )
    ns_steps: int = option(
        5, "Iterations of the orthogonaliser: always 5 (both orthogonalisers are fixed 5-step schedules in Dion2; "
        "the key stays so saved configs load)."
    )
    fast_cpu_orthogonalization: bool = option(
        False, "Opt-in CPU speed path: bf16 orthogonaliser products as fp32 sgemm rounded once. Not upstream's bits "
        "(a different, equally accurate approximation; divergence table in docs/optimizers.md); default: exact."
    )
    selection_scope: Literal["local", "global"] = option(
        "local", "Under FSDP2: select rows per shard ('local') or over the full matrix ('global')."
    )
    scalar_algorithm: Literal["adamw", "lion"] = option("adamw", "Algorithm for embeddings, norms and biases.")
    matrix_lr: float | None = option(
        None, "Peak LR of the Dion2 (matrix) group; null: optimizer.lr / sqrt(fraction), which with adjust_lr "
        "'rms_norm' gives a whole-matrix update RMS equal to AdamW's at optimizer.lr (docs/optimizers.md)."
    )
    implementation: Literal["native", "upstream"] = option(
        "native", "'upstream' uses Microsoft's dion.Dion2 when it is installed."
    )

    def __post_init__(self) -> None:
        checks = (
            ("fraction", 0 < self.fraction <= 1, "in (0, 1]"),
            ("ef_decay", self.ef_decay >= 0, ">= 0"),
            ("ns_steps", self.ns_steps == 5,
             "5 (Dion2's polar_express and newton_schulz are fixed 5-step schedules; remove the key or set it to 5)"),
            ("matrix_lr", self.matrix_lr is None or self.matrix_lr > 0, "> 0 or null"),
            *self._clip_checks(),
        )
        _validate("dion2_config", self, checks)


@dataclass
class DionConfig:
    """Dion (v1): rank-r orthonormal updates by warm-started power iteration with error feedback (docs/specs/dion.md).

    On a 2-D (replicate x shard) mesh ``replicate_mesh_grad_sync: true`` makes FSDP reduce gradients over the shard
    axis only, and Dion averages just its low-rank factors P and R over the replicate axis (docs/distributed.md).
    """

    rank_fraction: float = option(
        0.5, "Rank r = rank_fraction * min(m, n) (rounded up to rank_multiple_of, capped at min(m, n)).")
    rank_multiple_of: int = option(1, "Round r up to a multiple of this (e.g. the shard count, or 8/16 for kernels).")
    mu: float = option(0.95, "Momentum / error-feedback factor: the captured rank-r part of M decays by mu.")
    power_iters: int = option(1, "Power iterations per step (upstream dion.Dion: 1; DionReference allows more).")
    qr_method: Literal["rcqr", "qr", "cqr"] = option(
        "rcqr", "Orthonormaliser of P: randomized Cholesky QR (upstream), Householder 'qr', or Cholesky 'cqr' after "
        "cqr_warmup_steps.")
    cqr_warmup_steps: int = option(150, "qr_method 'cqr' uses rcqr for the first steps (Cholesky QR squares the "
                                   "condition number of a cold Q).")
    rcqr_oversample: float = option(1.25, "RCQR sketch rows = 128 * ceil(rcqr_oversample * r / 128).")
    sketch_seed: int = option(0, "Seed of the per-(step, param) RCQR sketch and the initial Q (never the global RNG).")
    matrix_lr: float | None = option(
        None, "Peak LR of the Dion (matrix) groups; null: optimizer.lr. The update is sqrt(m/n)*lr*P Q^T with "
        "||P Q^T||_F^2 = r; upstream's 160M GPT recipe uses 0.02.")
    scalar_algorithm: Literal["adamw", "lion"] = option("adamw", "Algorithm for embeddings, norms, biases and heads.")
    lm_head_lr_rule: Literal["upstream", "none"] = option(
        "upstream", "LR of an untied 2-D head (scalar group): 'upstream' = lr/sqrt(d_in) under Lion, lr under AdamW "
        "(dion's lm_head_lr_scale); 'none' = lr. The tied NeoBERT head is the embedding and is never scaled.")
    replicate_mesh_grad_sync: bool | None = option(
        None, "On a 2-D HSDP mesh: Dion averages its low-rank factors over the replicate axis and FSDP reduces over "
        "the shard axis only (true), or FSDP averages full gradients over both axes (false). null: true on HSDP. "
        "true needs an HSDP launch (configs/accelerate/hsdp_*.yaml).")
    momentum_dtype: Literal["param", "bfloat16", "float32"] = option(
        "param", "Dtype of every momentum buffer (Dion's M, AdamW/Lion m); 'param' = the parameter dtype.")
    q_dtype: Literal["param", "bfloat16", "float32"] = option("param", "Dtype of Dion's right factor Q.")
    variance_dtype: Literal["param", "bfloat16", "float32"] = option("param", "Dtype of AdamW's variance.")

    def __post_init__(self) -> None:
        checks = (
            ("rank_fraction", 0 < self.rank_fraction <= 1, "in (0, 1]"),
            ("rank_multiple_of", self.rank_multiple_of >= 1, ">= 1"),
            ("mu", 0 <= self.mu < 1, "in [0, 1)"),
            ("power_iters", self.power_iters >= 1, ">= 1"),
            ("cqr_warmup_steps", self.cqr_warmup_steps >= 0, ">= 0"),
            ("rcqr_oversample", self.rcqr_oversample >= 1, ">= 1"),
            ("sketch_seed", self.sketch_seed >= 0, ">= 0"),
            ("matrix_lr", self.matrix_lr is None or self.matrix_lr > 0, "> 0 or null"),
        )
        _validate("dion_config", self, checks)


@dataclass
class DanaConfig:
    """The DANA family (adana, dana-mk4, dana-star, dana-star-mk4) and adamw-decaying-wd; defaults = paper values.

    Epsilon comes from ``optimizer.eps`` (and betas from ``optimizer.betas`` for adamw-decaying-wd). Weight decay is
    derived, never set directly: ``weight_decay = omega / wd_ts`` on the matrix groups (the current "independent"
    convention; the legacy ``omega / (lr * wd_ts)`` would inflate it by 1/lr and collapse the weights).
    """

    delta: float = option(8.0, "EMA rate constant: a_t = delta / (delta + t) for m, v and tau (not retuned per size).")
    kappa: float = option(
        0.85, "Damping exponent: momentum coefficient 1 + (1 + t)^(1 - kappa); the LR rule is keyed by it."
    )
    clipsnr: float = option(2.0, "Cap on the Nesterov term of dana-mk4 / dana-star-mk4 (ignored by adana, dana-star).")
    omega: float = option(4.0, "Weight-decay strength: weight_decay = omega / wd_ts (0 disables decay).")
    wd_ts: float | None = option(None, "Weight-decay time scale in optimizer steps; null: wd_ts_fraction * max_steps.")
    wd_ts_fraction: float = option(0.1, "wd_ts = floor(wd_ts_fraction * trainer.max_steps) when wd_ts is null.")
    wd_decaying: bool = option(True, "Decay the weight decay over time: divide it by (1 + t / wd_ts).")
    gamma_3_factor: float = option(1.0, "Scale of the whole momentum term (plain + Nesterov); 0 gives RMSprop.")
    foreach: bool = option(True, "Multi-tensor (torch._foreach) kernels; false steps one tensor at a time (same maths).")
    update_kernel: Literal["auto", "eager", "compiled"] = option(
        "auto",
        "DANA update kernel: 'compiled' = one torch.compile'd elementwise pass per tensor (compiles once, tens of "
        "seconds on a CPU); 'eager' = the foreach kernels; 'auto' = compiled on CUDA when torch.compile works, else eager.",
    )

    def __post_init__(self) -> None:
        checks = (
            ("delta", self.delta > 0, "> 0"),
            ("clipsnr", self.clipsnr > 0, "> 0 (a cap <= 0 flips the Nesterov term)"),
            ("omega", self.omega >= 0, ">= 0"),
            ("wd_ts", self.wd_ts is None or self.wd_ts > 0, "> 0 or null"),
            ("wd_ts_fraction", 0 < self.wd_ts_fraction, "> 0"),
        )
        _validate("dana_config", self, checks)


@dataclass
class SharedOptimizerSettings:
    """Which optimizer and its shared hyperparameters."""

    # The registered names become this field's choices in OptimizerConfig (built below from the catalog).
    name: str = option("adamw", "Optimizer (see docs/optimizers.md).")
    lr: float | Literal["auto"] = option(
        6e-4, "Peak learning rate; 'auto' applies the DANA paper's power law in non-embedding params (logged)."
    )
    betas: list[float] = option([0.9, 0.98], "Adam betas (AdamW, and the scalar group of orthonormal optimizers).")
    eps: float = option(1e-8, "Adam epsilon.")
    weight_decay: float = option(0.01, "Decoupled weight decay on 2-D block weights (never on norms/embeddings).")

    def __post_init__(self) -> None:
        """The shared hyperparameters, checked here so a bad value is one line naming the key (not torch's
        ``Invalid learning rate`` or an ``IndexError`` at optimizer construction)."""
        lr, betas = self.lr, self.betas
        checks = (
            ("lr", lr == "auto" or (math.isfinite(lr) and lr > 0), "a finite number > 0 or 'auto'"),
            ("betas", len(betas) == 2, "a list of two numbers, e.g. [0.9, 0.98]"),
            ("betas", all(math.isfinite(b) and 0 <= b < 1 for b in betas), "two numbers in [0, 1)"),
            ("eps", math.isfinite(self.eps) and self.eps > 0, "a finite number > 0"),
            ("weight_decay", math.isfinite(self.weight_decay) and self.weight_decay >= 0, "a finite number >= 0"),
        )
        for key, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"optimizer.{key}={getattr(self, key)!r} is invalid: must be {allowed}; "
                                  f"set --optimizer.{key} to a valid value.")


# ---------------------------------------------------------------------------------------------------------------
# The built-in optimizers. Each is registered once: summary, builder ("module:function", imported only when that
# optimizer is built, so this module stays torch-free), config sub-block and the peak-LR power laws of
# `optimizer.lr: auto`. Those are the DANA paper's "Enoki" fits (`src/config/scaling_rules.yaml` in mlexpos/adana):
# kappa (None: no role) -> {tokens per step: (a, b, d)} of lr* = a * (b + P) ** d; neobert_pt/optim/lr_rule.py
# documents how they are used. Registration order is the order of the choices and sub-blocks in the docs.

register_optimizer(
    "adamw",
    summary="torch.optim.AdamW (fused); decoupled weight decay on the 2-D block weights only.",
    builder="neobert_pt.optim.registry:build_adamw",
    lr_fits={None: {SMALL_BATCH_TOKENS: (12.8, 1.67e4, -0.515), LARGE_BATCH_TOKENS: (16.7, 1.58e7, -0.464)}},
)
register_optimizer(
    "adana",
    summary="ADana: log-time EMAs and damped Nesterov momentum, decaying weight decay (DANA family).",
    builder="neobert_pt.optim.dana:build_adana",
    config=DanaConfig,
    block="dana_config",
    lr_fits={
        0.75: {SMALL_BATCH_TOKENS: (12.7, 9.55e3, -0.624)},
        0.80: {SMALL_BATCH_TOKENS: (17.6, 3.66e4, -0.624)},
        0.85: {SMALL_BATCH_TOKENS: (22.5, 1.22e5, -0.618), LARGE_BATCH_TOKENS: (85.3, 3.04e4, -0.654)},
        0.90: {SMALL_BATCH_TOKENS: (68.9, 2.95e4, -0.667)},
    },
)
register_optimizer(
    "dana-mk4",
    summary="ADana with the Nesterov term capped at dana_config.clipsnr.",
    builder="neobert_pt.optim.dana:build_dana_mk4",
    config=DanaConfig,
    block="dana_config",
    lr_fits={
        0.75: {SMALL_BATCH_TOKENS: (56.0, 5.71e3, -0.708)},
        0.85: {SMALL_BATCH_TOKENS: (23.0, 1.46e4, -0.627), LARGE_BATCH_TOKENS: (2.47e3, 2.24e7, -0.826)},
    },
)
register_optimizer(
    "dana-star",
    summary="Dana-Star: ADana normalised by the RMS of active gradients (per-element activity estimate tau).",
    builder="neobert_pt.optim.dana:build_dana_star",
    config=DanaConfig,
    block="dana_config",
    lr_fits={
        0.75: {SMALL_BATCH_TOKENS: (41.0, 3.03e4, -0.661)},
        0.85: {SMALL_BATCH_TOKENS: (223.0, 2.40e6, -0.724)},
    },
)
register_optimizer(
    "dana-star-mk4",
    summary="Dana-Star with the capped Nesterov term; the recommended DANA variant for encoders.",
    builder="neobert_pt.optim.dana:build_dana_star_mk4",
    config=DanaConfig,
    block="dana_config",
    lr_fits={
        0.75: {SMALL_BATCH_TOKENS: (41.0, 3.03e4, -0.661)},
        0.85: {SMALL_BATCH_TOKENS: (223.0, 2.40e6, -0.724), LARGE_BATCH_TOKENS: (310.0, 1.40e4, -0.701)},
    },
)
register_optimizer(
    "adamw-decaying-wd",
    summary="The DANA paper's baseline: bias-corrected Adam with the same decaying weight decay.",
    builder="neobert_pt.optim.dana:build_adamw_decaying_wd",
    config=DanaConfig,
    block="dana_config",
    lr_fits={None: {SMALL_BATCH_TOKENS: (65.7, 9.83e3, -0.608)}},
)
register_optimizer(
    "muonclip",
    summary="Muon on the hidden matrices + AdamW on the rest, optional QK-clip.",
    builder="neobert_pt.optim.muon:build_muonclip",
    config=MuonConfig,
    block="muon_config",
)
register_optimizer(
    "dion2",
    summary="Dion2: sparse orthonormal updates with error feedback + AdamW/Lion, optional QK-clip.",
    builder="neobert_pt.optim.dion2:build_dion2",
    config=Dion2Config,
    block="dion2_config",
)
register_optimizer(
    "dion",
    summary="Dion v1: rank-r orthonormal updates by power iteration with error feedback + AdamW/Lion.",
    builder="neobert_pt.optim.dion:build_dion",
    config=DionConfig,
    block="dion_config",
)

# The optimizer section: SharedOptimizerSettings + `name` limited to the registered optimizers + one field per
# sub-block. Registration is closed from here on (neobert_pt/optim/catalog.py).
OptimizerConfig = optimizer_section(SharedOptimizerSettings)
