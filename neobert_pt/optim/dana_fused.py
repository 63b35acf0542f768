"""Fused (``torch.compile``) per-tensor updates for ADana / Dana-MK4 and Dana-Star / Dana-Star-MK4.

The eager kernels in ``dana.py`` make ~15-30 multi-tensor passes over fp32 state per step, so the step is
memory-bound at 7-55x AdamW's single fused pass. Here the same maths (docs/specs/dana.md §2.3 / §2.4) is one
elementwise function per parameter tensor; inductor turns it into ONE loop (C++ on CPU, Triton on CUDA) that reads
p, g, m, v (, tau) once and writes them back once.

* Once the passes are fused the CPU cost is arithmetic: a vector square root or division costs several multiplies
  and a ``log`` several more. The kernels therefore rearrange docs/specs/dana.md's formulas (each rearrangement is
  stated where it is made): the Nesterov cap as one clamp, Dana-Star's rho / n / cap from one division and one root,
  and Dana-Star's per-element clock ``T^(1-kappa)`` without any transcendental function (see ``clock_power``).
  Results equal the eager kernels up to fp32 rounding.
* Tensors are flattened to 1-D and the function is compiled with ``dynamic=True``: one compiled kernel serves every
  parameter shape of a given rank (dynamo guards on the rank of the flat view's base, so a transformer compiles
  each variant twice, for its 2-D and 1-D parameters; tens of seconds on a small CPU, cached on disk by inductor
  for later processes) and never recompiles after that.
* The per-step scalars travel as one small fp32 tensor (not Python floats, which would be specialised and
  recompile every step). The eager foreach kernels also apply Python scalars in fp32 (the op math type of fp32
  tensors), so the two paths agree to rounding; ``tests/unit/optim/test_dana_fused.py`` checks them against the
  reference fixture at its tolerance and against the eager kernels.
* Only contiguous tensors are fused (their flat view aliases the storage); a bucket with any other tensor uses the
  eager kernel.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

logger = logging.getLogger("neobert_pt.optim")

_COMPILED: dict[str, Callable[..., None]] = {}
_DISABLED: dict[str, str] = {}  # kernel name -> why compiling failed (then eager is used, logged once)


def _adana_kernel(p: Tensor, g: Tensor, m: Tensor, v: Tensor, c: Tensor) -> None:
    # c = [a, epsilon, clock^(1-kappa), clipsnr (inf: none), gamma3, lr, 1 - f]
    a, eps, clock, clip, gamma3, lr, keep = c.unbind(0)
    m.lerp_(g, a)
    v.copy_(v * (1.0 - a) + a * (g * g))
    n = 1.0 / (v.sqrt() + eps)
    m_n = m * n
    # sign(m) * min(|m| n T, c) == clamp(m n T, -c, c): n, T > 0, so m n T carries the sign of m (no abs/sign pass)
    nesterov = torch.clamp(m_n * clock, -clip, clip)
    update = g * n + gamma3 * (m_n + nesterov)
    p.copy_((p - lr * update) * keep)


# Dana-Star's clock T^beta (beta = 1 - kappa, T = max(tau t, 1) >= 1) per element, with no log/exp/pow.
# inductor's vectorised log + exp2 (SLEEF, 1-ulp) cost as much as the whole rest of the kernel on a CPU, and a
# bit-level log2 is no way out: inductor emits a float<->int bitcast as a scalar loop. So T is brought into
# [1, sqrt 2) by a ladder of exact power-of-two halvings, T * 2^-k when T >= 2^k for k = 16, 8, 4, 2, 1 (then one
# inexact 1/sqrt 2 step), each multiplying the result by the host constant 2^(k beta); a degree-5 polynomial in
# u = T - 1 fitted to (1 + u)^beta on [0, sqrt 2 - 1] does the rest. Relative error: ~4e-8 for the fit, a few fp32
# roundings once evaluated (under 3.2e-7 for kappa in [0, 1]; tests/unit/optim/test_dana_clock_power.py bounds it
# by 5e-7), next to fp32 pow's own ~1.7e-7. It covers T < 2^31.5, so steps t < MAX_FUSED_STEP (beyond: eager).
_HALVINGS = (16.0, 8.0, 4.0, 2.0, 1.0, 0.5)
_POW_DEGREE = 5
MAX_FUSED_STEP = 2**31


@functools.lru_cache(maxsize=32)
def clock_constants(beta: float) -> tuple[float, ...]:
    """(2^k, 2^-k, 2^(k beta)) for every halving k, then the power-basis coefficients of (1 + u)^beta's fit."""
    ladder = [x for k in _HALVINGS for x in (2.0**k, 2.0**-k, 2.0 ** (k * beta))]
    # least squares of the RELATIVE error on a dense float64 grid of the reduced range
    u = torch.linspace(0.0, math.sqrt(2.0) - 1.0, 4097, dtype=torch.float64)
    f = (1.0 + u) ** beta
    basis = torch.stack([u**j for j in range(_POW_DEGREE + 1)], dim=1) / f[:, None]
    coeffs = torch.linalg.lstsq(basis, torch.ones_like(u)[:, None]).solution[:, 0]
    return tuple(ladder) + tuple(coeffs.tolist())


def clock_power(T: Tensor, q: Sequence[Tensor]) -> Tensor:
    """T^beta for T in [1, 2^31.5), from ``q = clock_constants(beta)`` (as scalar tensors); plain torch ops."""
    scale = None
    for i in range(len(_HALVINGS)):
        threshold, halve, factor = q[3 * i], q[3 * i + 1], q[3 * i + 2]
        big = T >= threshold
        T = torch.where(big, T * halve, T)
        step = torch.where(big, factor, 1.0)
        scale = step if scale is None else scale * step
    coeffs = q[3 * len(_HALVINGS):]
    u = T - 1.0
    poly = coeffs[-1]
    for c in reversed(coeffs[:-1]):
        poly = poly * u + c
    return scale * poly


def _dana_star_kernel(p: Tensor, g: Tensor, m: Tensor, v: Tensor, tau: Tensor, c: Tensor) -> None:
    # c = [a, epsilon, t, 1 / (1 + t), clipsnr (inf: none), gamma3, lr, 1 - f, *clock_constants(1 - kappa)]
    a, eps, t, floor, clip, gamma3, lr, keep, *q = c.unbind(0)
    m.lerp_(g, a)
    v.copy_(v * (1.0 - a) + a * (g * g))
    d = v.sqrt() + eps
    abs_g = g.abs()
    tau.lerp_(abs_g / (abs_g + d), a)
    # Square roots and divisions set this kernel's cost on a CPU (each ~10x a multiply per vector), so
    # docs/specs/dana.md's rho = max(tc / (1 - tc), floor), n = sqrt(rho) / d and |m| / (sqrt(rho) d) share ONE division
    # and ONE root:
    # with s = 1 - tc and x = max(tc, floor * s) (so rho = x / s), w = 1 / (s d) gives
    # n = sqrt(x s) * w  (= sqrt(x / s) / d) and rho = x * w * d; equal to the eager kernel up to rounding.
    tc = tau.clamp_max(0.5)
    s = 1.0 - tc
    x = torch.maximum(tc, floor * s)
    w = 1.0 / (s * d)
    n = (x * s).sqrt() * w
    rho = x * w * d
    clock = clock_power(torch.clamp_min(tau * t, 1.0), q)
    m_n = m * n
    # sign(m) * rho * min(|m| T / (sqrt(rho) d), c) == clamp(m n T, -c rho, c rho), as rho > 0 and m n T has m's sign
    cap = clip * rho
    nesterov = torch.clamp(m_n * clock, -cap, cap)
    update = g * n + gamma3 * (m_n + nesterov)
    p.copy_((p - lr * update) * keep)


_KERNELS = {"adana": _adana_kernel, "dana_star": _dana_star_kernel}


def compiled_available() -> tuple[bool, str]:
    """Whether torch.compile can build the fused kernel here, and a short reason."""
    if not torch._dynamo.is_dynamo_supported():
        return False, "torch.compile is not supported on this Python/torch build"
    if torch.cuda.is_available():
        try:
            import triton  # noqa: F401
        except ImportError:
            return False, "CUDA without triton"
        return True, "torch.compile (Triton)"
    return True, "torch.compile (inductor C++)"


# cpp.dynamic_threads: always one OpenMP loop, its thread count taken at run time. Without it inductor decides at
# compile time from torch.get_num_threads() and the FIRST example's size (a dynamic-shape kernel is then reused, from
# its on-disk cache too, for every size): compiled in a 1-thread process (the test suite) or first called on a small
# tensor, the kernel had no parallel loop and a 2-thread run used one core.
# cpp.enable_floating_point_contract_flag="fast": the C++ compiler may fuse a * b + c into one FMA (inductor compiles
# with -ffp-contract=off by default); the clock's polynomial and the lerps are chains of them, ~10% of the CPU
# kernel's time. An FMA rounds once instead of twice, so results stay within the eager kernels' tolerance. Both are
# C++ (CPU) options; Triton contracts on its own.
COMPILE_OPTIONS = {"cpp.dynamic_threads": True, "cpp.enable_floating_point_contract_flag": "fast"}


def kernel(name: str) -> Callable[..., None]:
    """The compiled kernel ``name`` ("adana" or "dana_star"), built on first use; args: flat p, g, m, v[, tau], c."""
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(_KERNELS[name], dynamic=True, fullgraph=True, options=COMPILE_OPTIONS)
    return _COMPILED[name]


def fusable(tensors: list[list[Tensor]]) -> bool:
    return all(x.is_contiguous() and x.dtype == torch.float32 for group in tensors for x in group)


def run_fused(name: str, tensors: list[list[Tensor]], scalars: list[float]) -> bool:
    """Apply kernel ``name`` to every tensor (lists of p, g, m, v[, tau]); False when it cannot (use eager)."""
    if name in _DISABLED or not fusable(tensors):
        return False
    c = torch.tensor(scalars, dtype=torch.float32, device=tensors[0][0].device)
    fn = kernel(name)
    for i, row in enumerate(zip(*tensors, strict=True)):
        try:
            fn(*(x.view(-1) for x in row), c)
        except Exception as exc:  # compiler missing/broken: fall back once, loudly, keep training
            if i > 0:
                raise
            _DISABLED[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            logger.warning("fused DANA update unavailable (%s); using the eager kernel", _DISABLED[name])
            return False
    return True


def adana_scalars(*, t: int, lr: float, f: float, delta: float, kappa: float, epsilon: float,
                  clipsnr: float | None, gamma3: float) -> list[float]:
    a = delta / (delta + t)
    clip = math.inf if clipsnr is None else clipsnr
    return [a, epsilon, (1.0 + t) ** (1.0 - kappa), clip, gamma3, lr, 1.0 - f]


def dana_star_scalars(*, t: int, lr: float, f: float, delta: float, kappa: float, epsilon: float,
                      clipsnr: float | None, gamma3: float) -> list[float]:
    a = delta / (delta + t)
    clip = math.inf if clipsnr is None else clipsnr
    return [a, epsilon, float(t), 1.0 / (1.0 + t), clip, gamma3, lr, 1.0 - f, *clock_constants(1.0 - kappa)]
