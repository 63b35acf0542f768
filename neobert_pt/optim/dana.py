"""The DANA family (ADana, Dana-MK4, Dana-Star, Dana-Star-MK4) and AdamW with decaying weight decay.

From "Logarithmic-time Schedules for Scaling Language Models with Momentum" (Ferbach, C. Paquette, Gidel, Everett,
E. Paquette; arXiv:2602.05298). The maths follows the project spec (docs/specs/dana.md), which
restates the public reference at mlexpos/adana@3eef26f with its *current* conventions:

* log-time EMA ``a_t = delta / (delta + t)`` shared by m, v (and tau), no bias correction, first update at t = 1;
* momentum coefficient ``1 + T^(1-kappa)`` (plain momentum + damped Nesterov extra), times ``gamma_3_factor``;
  the MK4 variants cap only the Nesterov extra at ``clipsnr``;
* "independent" weight decay applied *after* the step: ``theta <- (theta + Delta) * (1 - f_t)`` with
  ``f_t = weight_decay * s_t / (1 + t / wd_ts)`` (``wd_decaying``) and ``s_t = lr_t / peak_lr``.

Design: one base class owns the step loop (closure, skipping params without grad, lazy fp32 state, DTensor → local
tensors, bf16 upcast, bucketing for the multi-tensor path); each variant is one pure function over lists of local
fp32 tensors. Every op is elementwise on the parameter's own shard with Python-float scalars, so the update is
shard-local (FSDP2-safe, no collectives) and needs no torch.compile. ``foreach=True`` only changes how tensors are
bucketed into one kernel call (same ops, same order), so it matches the per-tensor path.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from neobert_pt.config.errors import ConfigError
from neobert_pt.optim import dana_fused
from neobert_pt.optim.orthonormal import local
from neobert_pt.optim.registry import BuiltOptimizer, OptimizerContext, torch_param_groups

__all__ = ["ADana", "AdamWDecayingWD", "DanaStar"]


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """fp32 for low-precision params (bf16 state freezes the log-time EMA, docs/specs/dana.md §4.12), else the param's
    dtype."""
    return torch.promote_types(param_dtype, torch.float32)


def wd_factor(weight_decay: float, schedule: float, t: int, wd_decaying: bool, wd_ts: float) -> float:
    """docs/specs/dana.md §2.5: per-step multiplicative decay f_t (independent of the peak LR, scaled by the
    schedule)."""
    f = weight_decay * schedule
    return f / (1.0 + t / wd_ts) if wd_decaying else f


# --------------------------------------------------------------------------------------------------------------
# Pure update kernels. Inputs are lists of local fp32 tensors that all share the step count ``t``; ``params``,
# ``m``, ``v``, ``tau`` are updated in place, ``grads`` is read only. Scalars are Python floats (float64 maths).
# --------------------------------------------------------------------------------------------------------------


def _log_time_moments(m: list[Tensor], v: list[Tensor], grads: list[Tensor], a: float) -> list[Tensor]:
    """docs/specs/dana.md §2.2: m, v <- lerp toward g, g² with weight a_t; returns d = sqrt(v) + eps (eps added by
    caller)."""
    torch._foreach_lerp_(m, grads, a)
    torch._foreach_mul_(v, 1.0 - a)
    torch._foreach_addcmul_(v, grads, grads, value=a)
    return torch._foreach_sqrt(v)


def _apply_step(
    params: list[Tensor], grads: list[Tensor], n: list[Tensor], nesterov: list[Tensor], m_n: list[Tensor],
    lr: float, gamma3: float, f: float,
) -> None:
    """theta <- (theta - lr * [g*n + gamma3 * (m*n + nesterov)]) * (1 - f); ``m_n`` and ``nesterov`` are consumed."""
    torch._foreach_add_(m_n, nesterov)
    update = torch._foreach_mul(grads, n)
    torch._foreach_add_(update, m_n, alpha=gamma3)
    torch._foreach_add_(params, update, alpha=-lr)
    if f != 0.0:  # multiplying by exactly 1 would be a no-op anyway
        torch._foreach_mul_(params, 1.0 - f)


def adana_update(
    params: list[Tensor], grads: list[Tensor], m: list[Tensor], v: list[Tensor], *,
    t: int, lr: float, f: float, delta: float, kappa: float, epsilon: float, clipsnr: float | None, gamma3: float,
) -> None:
    """docs/specs/dana.md §2.3 (ADana; Dana-MK4 when ``clipsnr`` is set): no tau, scalar clock T = 1 + t."""
    d = _log_time_moments(m, v, grads, delta / (delta + t))
    torch._foreach_add_(d, epsilon)
    n = torch._foreach_reciprocal(d)
    m_n = torch._foreach_mul(m, n)
    # A = T^(1-kappa) * |m| * n  (|m*n| == |m|*n exactly since n > 0)
    nesterov = torch._foreach_abs(m_n)
    torch._foreach_mul_(nesterov, (1.0 + t) ** (1.0 - kappa))
    if clipsnr is not None:
        torch._foreach_clamp_max_(nesterov, clipsnr)
    torch._foreach_mul_(nesterov, torch._foreach_sign(m))
    _apply_step(params, grads, n, nesterov, m_n, lr, gamma3, f)


def dana_star_update(
    params: list[Tensor], grads: list[Tensor], m: list[Tensor], v: list[Tensor], tau: list[Tensor], *,
    t: int, lr: float, f: float, delta: float, kappa: float, epsilon: float, clipsnr: float | None, gamma3: float,
) -> None:
    """docs/specs/dana.md §2.4 (Dana-Star; Dana-Star-MK4 when ``clipsnr`` is set): per-element activity estimate tau."""
    a = delta / (delta + t)
    d = _log_time_moments(m, v, grads, a)
    torch._foreach_add_(d, epsilon)
    # tau <- lerp(tau, |g| / (|g| + d), a): the new v, the current g
    abs_g = torch._foreach_abs(grads)
    torch._foreach_lerp_(tau, torch._foreach_div(abs_g, torch._foreach_add(abs_g, d)), a)
    # rho = max(tau_c / (1 - tau_c), 1 / (1 + t)) with tau_c = min(tau, 1/2)
    rho = torch._foreach_clamp_max(tau, 0.5)
    one_minus = torch._foreach_neg(rho)
    torch._foreach_add_(one_minus, 1.0)
    torch._foreach_div_(rho, one_minus)
    torch._foreach_clamp_min_(rho, 1.0 / (1.0 + t))
    # clock T = max(tau * t, 1) from the UNclipped tau
    clock = torch._foreach_mul(tau, float(t))
    torch._foreach_clamp_min_(clock, 1.0)
    torch._foreach_pow_(clock, 1.0 - kappa)
    sqrt_rho = torch._foreach_sqrt(rho)
    n = torch._foreach_div(sqrt_rho, d)
    m_n = torch._foreach_mul(m, n)
    # A = T^(1-kappa) * |m| / (sqrt(rho) * d)
    nesterov = torch._foreach_abs(m)
    torch._foreach_div_(nesterov, torch._foreach_mul(sqrt_rho, d))
    torch._foreach_mul_(nesterov, clock)
    if clipsnr is not None:
        torch._foreach_clamp_max_(nesterov, clipsnr)
    torch._foreach_mul_(nesterov, rho)
    torch._foreach_mul_(nesterov, torch._foreach_sign(m))
    _apply_step(params, grads, n, nesterov, m_n, lr, gamma3, f)


def adamw_decaying_wd_update(
    params: list[Tensor], grads: list[Tensor], exp_avg: list[Tensor], exp_avg_sq: list[Tensor], *,
    t: int, lr: float, f: float, beta1: float, beta2: float, eps: float,
) -> None:
    """docs/specs/dana.md §2.8: bias-corrected Adam step, then theta <- theta * (1 - f) (skipped when f = 0)."""
    torch._foreach_lerp_(exp_avg, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sq, beta2)
    torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1.0 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sq)
    torch._foreach_div_(denom, math.sqrt(1.0 - beta2**t))
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avg, denom, value=-lr / (1.0 - beta1**t))
    if f != 0.0:
        torch._foreach_mul_(params, 1.0 - f)


# --------------------------------------------------------------------------------------------------------------
# Shared step loop
# --------------------------------------------------------------------------------------------------------------


class _LogTimeOptimizer(torch.optim.Optimizer):
    """Step loop shared by the family; subclasses name their state buffers and implement ``_update``.

    Every hyperparameter, including ``peak_lr`` (the constructor ``lr``, or a group's own ``lr`` when it sets one),
    lives in the param groups, so ``state_dict()`` carries them and a reload cannot silently change behaviour.
    State is at least fp32 whatever the parameter dtype (bf16 state freezes the log-time EMA,
    docs/specs/dana.md §4.12); under FSDP2 the buffers are DTensors sharded like their parameter and the maths runs
    on the local shards.
    """

    _state_names: tuple[str, ...] = ()

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # The peak LR defaults to the group's own LR, so a group at 2x LR has schedule factor 1 at its peak.
        if "lr" in param_group and "peak_lr" not in param_group:
            param_group["peak_lr"] = param_group["lr"]
        super().add_param_group(param_group)

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                state: dict[str, list[Tensor]], t: int, lr: float, f: float) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = float(group["lr"])
            schedule = lr / group["peak_lr"] if group["peak_lr"] != 0 else 0.0
            # Bucket by (step count, device, dtype) so one kernel call sees one t; per-tensor path: one bucket per param.
            buckets: dict[Any, list[tuple[Tensor, Tensor, dict[str, Tensor]]]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:  # docs/specs/dana.md §2.1: no state, no step count, no weight decay
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                if p.is_complex():
                    raise RuntimeError(f"{type(self).__name__} does not support complex parameters")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    for name in self._state_names:
                        state[name] = torch.zeros_like(p, dtype=state_dtype(p.dtype), memory_format=torch.preserve_format)
                state["step"] += 1
                key = (state["step"], p.device, p.dtype) if group["foreach"] else id(p)
                buckets[key].append((p, p.grad, state))
            for entries in buckets.values():
                t = entries[0][2]["step"]
                self._step_bucket(group, entries, t, lr, schedule)
        return loss

    def _step_bucket(self, group: dict[str, Any], entries: list[tuple[Tensor, Tensor, dict[str, Tensor]]],
                     t: int, lr: float, schedule: float) -> None:
        f = wd_factor(group["weight_decay"], schedule, t, group["wd_decaying"], group["wd_ts"])
        locals_p = [local(p) for p, _, _ in entries]
        # fp32 (or fp64) maths: low-precision params get a working copy and one cast back at the end.
        dtype = state_dtype(locals_p[0].dtype)
        work = [x.to(dtype) for x in locals_p]
        grads = [local(g).to(dtype) for _, g, _ in entries]
        state = {name: [local(s[name]) for _, _, s in entries] for name in self._state_names}
        self._update(group, work, grads, state, t, lr, f)
        for dst, src in zip(locals_p, work, strict=True):
            if dst is not src:
                dst.copy_(src)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load, keeping the buffers fp32: torch would cast them to the parameter dtype (bf16 state is lossy)."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params, strict=True):
            saved = state_dict["state"].get(saved_id)
            if not saved:
                continue
            for name in self._state_names:
                if name in saved:
                    self.state[p][name] = saved[name].to(device=p.device, dtype=state_dtype(p.dtype))


def _check_dana_args(lr: float, delta: float, epsilon: float, weight_decay: float, clipsnr: float | None,
                     wd_ts: float) -> None:
    if lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not delta > 0:
        raise ValueError(f"delta must be > 0, got {delta}")
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0 (untouched coordinates would give 0/0), got {epsilon}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if clipsnr is not None and not clipsnr > 0:
        raise ValueError(f"clipsnr must be None or > 0 (a cap <= 0 flips the Nesterov term), got {clipsnr}")
    if not wd_ts > 0:
        raise ValueError(f"wd_ts must be > 0, got {wd_ts}")


class _DanaBase(_LogTimeOptimizer):
    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        delta: float = 8.0,
        kappa: float = 0.85,
        epsilon: float = 1e-8,
        weight_decay: float = 0.0,
        clipsnr: float | None = None,
        wd_decaying: bool = False,
        wd_ts: float = 1.0,
        gamma_3_factor: float = 1.0,
        *,
        foreach: bool = False,
        fused: bool = False,
    ) -> None:
        _check_dana_args(lr, delta, epsilon, weight_decay, clipsnr, wd_ts)
        # fused: one torch.compile'd elementwise kernel per tensor (dana_fused.py); not a group hyperparameter, so
        # a checkpoint does not carry it and the configured choice applies on resume.
        self.fused = fused
        defaults = dict(
            lr=lr, peak_lr=lr, delta=delta, kappa=kappa, epsilon=epsilon, weight_decay=weight_decay,
            clipsnr=clipsnr, wd_decaying=wd_decaying, wd_ts=wd_ts, gamma_3_factor=gamma_3_factor, foreach=foreach,
        )
        super().__init__(params, defaults)

    def _scalars(self, group: dict[str, Any], t: int, lr: float, f: float) -> dict[str, Any]:
        return dict(
            t=t, lr=lr, f=f, delta=group["delta"], kappa=group["kappa"], epsilon=group["epsilon"],
            clipsnr=group["clipsnr"], gamma3=group["gamma_3_factor"],
        )


class ADana(_DanaBase):
    """ADana (``clipsnr=None``, registry name ``adana``) or Dana-MK4 (``clipsnr=c``, ``dana-mk4``).

    AdamW-like with log-time betas 1 - delta/(delta+t), no bias correction, and momentum coefficient
    ``1 + (1+t)^(1-kappa)``. The constructor ``lr`` is the peak LR; an LR scheduler changes the group ``lr`` and
    the ratio scales both the step and the weight decay. Paper values: kappa 0.85, delta 8, ``wd_decaying=True``,
    ``weight_decay = omega / wd_ts`` with omega 4 and wd_ts = total_steps / 10.
    """

    _state_names = ("m", "v")

    def _update(self, group, params, grads, state, t, lr, f):  # type: ignore[no-untyped-def]
        scalars = self._scalars(group, t, lr, f)
        if self.fused and dana_fused.run_fused("adana", [params, grads, state["m"], state["v"]],
                                               dana_fused.adana_scalars(**scalars)):
            return
        adana_update(params, grads, state["m"], state["v"], **scalars)


class DanaStar(_DanaBase):
    """Dana-Star (``clipsnr=None``, ``dana-star``) or Dana-Star-MK4 (``clipsnr=c``, ``dana-star-mk4``).

    ADana plus a per-element estimate tau of how often a coordinate receives gradient: the step is normalised by
    the RMS of the *active* gradients and each coordinate's damping clock counts its own activity, which suits
    rare-token embedding rows. Same constructor as :class:`ADana`.
    """

    _state_names = ("m", "v", "tau")

    def _update(self, group, params, grads, state, t, lr, f):  # type: ignore[no-untyped-def]
        scalars = self._scalars(group, t, lr, f)
        tensors = [params, grads, state["m"], state["v"], state["tau"]]
        if (self.fused and t < dana_fused.MAX_FUSED_STEP
                and dana_fused.run_fused("dana_star", tensors, dana_fused.dana_star_scalars(**scalars))):
            return
        dana_star_update(*tensors, **scalars)


class AdamWDecayingWD(_LogTimeOptimizer):
    """Bias-corrected Adam followed by the DANA family's independent (optionally decaying) weight decay.

    The paper's AdamW baseline with ``f_t = weight_decay * s_t / (1 + t / wd_ts)``; decay is skipped when
    ``weight_decay`` is 0. ``epsilon`` is accepted as an alias of ``eps`` (the reference's keyword).
    """

    _state_names = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        wd_decaying: bool = False,
        wd_ts: float = 1.0,
        *,
        epsilon: float | None = None,
        foreach: bool = False,
    ) -> None:
        if epsilon is not None:
            eps = epsilon
        _check_dana_args(lr, 1.0, eps, weight_decay, None, wd_ts)
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"betas must be two values in [0, 1), got {betas}")
        defaults = dict(
            lr=lr, peak_lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, wd_decaying=wd_decaying,
            wd_ts=wd_ts, foreach=foreach,
        )
        super().__init__(params, defaults)

    def _update(self, group, params, grads, state, t, lr, f):  # type: ignore[no-untyped-def]
        beta1, beta2 = group["betas"]
        adamw_decaying_wd_update(
            params, grads, state["exp_avg"], state["exp_avg_sq"], t=t, lr=lr, f=f, beta1=beta1, beta2=beta2,
            eps=group["eps"],
        )


# --------------------------------------------------------------------------------------------------------------
# Registry builders (optimizer.dana_config)
# --------------------------------------------------------------------------------------------------------------


def resolve_wd_ts(ctx: OptimizerContext) -> float:
    """wd_ts in optimizer steps: the explicit value, else floor(wd_ts_fraction * max_steps) (at least 1)."""
    cfg = ctx.config.dana_config
    if cfg.wd_ts is not None:
        return float(cfg.wd_ts)
    return float(max(1, math.floor(cfg.wd_ts_fraction * ctx.max_steps)))


def _build_dana(ctx: OptimizerContext, cls: type[_DanaBase], clip: bool) -> BuiltOptimizer:
    cfg = ctx.config.dana_config
    wd_ts = resolve_wd_ts(ctx)
    # Independent-WD convention: omega / wd_ts, NOT the legacy omega / (lr * wd_ts)
    # (docs/specs/dana.md §0, correction 2).
    weight_decay = cfg.omega / wd_ts
    clipsnr = cfg.clipsnr if clip else None
    fused, why = resolve_update_kernel(cfg.update_kernel)
    groups = torch_param_groups(ctx, weight_decay)
    opt = cls(
        groups, lr=ctx.peak_lr, delta=cfg.delta, kappa=cfg.kappa, epsilon=ctx.config.eps, weight_decay=weight_decay,
        clipsnr=clipsnr, wd_decaying=cfg.wd_decaying, wd_ts=wd_ts, gamma_3_factor=cfg.gamma_3_factor,
        foreach=cfg.foreach, fused=fused,
    )
    line = (
        f"{ctx.config.name}: kappa={cfg.kappa} delta={cfg.delta} clipsnr={clipsnr} gamma_3={cfg.gamma_3_factor} "
        f"weight_decay=omega/wd_ts={cfg.omega}/{wd_ts:g}={weight_decay:.3g} (matrix groups) wd_decaying={cfg.wd_decaying}"
    )
    kernel_line = f"{ctx.config.name} update: {'fused, ' if fused else 'eager foreach kernels, '}{why}"

    return BuiltOptimizer(optimizer=opt, log_lines=[line, kernel_line])


def resolve_update_kernel(choice: str) -> tuple[bool, str]:
    """dana_config.update_kernel -> (fused?, why): 'auto' fuses on CUDA when torch.compile can, eager elsewhere."""
    ok, how = dana_fused.compiled_available()
    if choice == "eager":
        return False, "dana_config.update_kernel=eager"
    if choice == "compiled":
        if not ok:
            raise ConfigError(f"optimizer.dana_config.update_kernel=compiled is unavailable here ({how}); use 'auto' "
                              "or 'eager'")
        return True, f"{how} (dana_config.update_kernel=compiled)"
    if ok and torch.cuda.is_available():
        return True, f"{how} (auto: CUDA)"
    return False, f"auto: {'CPU (set update_kernel: compiled to fuse; compiles once)' if ok else how}"


def build_adana(ctx: OptimizerContext) -> BuiltOptimizer:
    """ADana: log-time momentum with damped Nesterov, no SNR clip."""
    return _build_dana(ctx, ADana, clip=False)


def build_dana_mk4(ctx: OptimizerContext) -> BuiltOptimizer:
    """ADana with the Nesterov extra capped at dana_config.clipsnr."""
    return _build_dana(ctx, ADana, clip=True)


def build_dana_star(ctx: OptimizerContext) -> BuiltOptimizer:
    """Dana-Star: ADana with the per-element activity estimate tau, no clip."""
    return _build_dana(ctx, DanaStar, clip=False)


def build_dana_star_mk4(ctx: OptimizerContext) -> BuiltOptimizer:
    """Dana-Star with the SNR clip: the recommended DANA default for encoders (rare-token rows, kappa robustness)."""
    return _build_dana(ctx, DanaStar, clip=True)


def build_adamw_decaying_wd(ctx: OptimizerContext) -> BuiltOptimizer:
    """The paper's AdamW baseline: optimizer.betas/eps, weight decay omega / wd_ts decaying like 1 / (1 + t/wd_ts)."""
    cfg = ctx.config.dana_config
    wd_ts = resolve_wd_ts(ctx)
    weight_decay = cfg.omega / wd_ts
    if len(ctx.config.betas) != 2:
        raise ConfigError(f"optimizer.betas must have two values, got {ctx.config.betas}")
    groups = torch_param_groups(ctx, weight_decay)
    opt = AdamWDecayingWD(
        groups, lr=ctx.peak_lr, betas=tuple(ctx.config.betas), eps=ctx.config.eps, weight_decay=weight_decay,
        wd_decaying=cfg.wd_decaying, wd_ts=wd_ts, foreach=cfg.foreach,
    )
    line = (
        f"adamw-decaying-wd: betas={tuple(ctx.config.betas)} weight_decay=omega/wd_ts={cfg.omega}/{wd_ts:g}="
        f"{weight_decay:.3g} (matrix groups) wd_decaying={cfg.wd_decaying}"
    )
    return BuiltOptimizer(optimizer=opt, log_lines=[line])
