"""Approximate orthogonalisation (polar factor ``U·Vᵀ``) for Muon and Dion2.

All routines take a 2-D ``(r, c)`` or batched 3-D ``(B, r, c)`` tensor and return a bf16 tensor of the same shape
whose singular values are pushed towards 1. Zero rows/columns stay exactly zero, which distributed padding relies
on. These are approximations: singular values land in about [0.58, 1.15] (PE5) and [0.43, 1.15] (NS5).

**Exact by default.** Every op is the plain bf16 torch op of the reference, in the reference's order: Polar Express
and NS5 as upstream ``microsoft/dion`` eager code writes them (``c * (A @ A)``), Keller Jordan's NS as
modded-nanogpt writes it (``c * A @ A`` = ``(c·A) @ A``). On a given machine and torch build the result is therefore
bit-identical to the reference. (bf16 GEMM bits depend on the kernel torch picks for the CPU: oneDNN AMX,
AVX512-BF16, or the scalar fallback; each sums in its own order, and five iterations spread a one-ulp difference
over most of the output. Bit-equality with a stored fixture therefore holds only on a CPU that takes the same
kernel; see docs/optimizers.md.)

**Fast CPU path (opt-in, ``fast_cpu=True``).** Some CPUs have no bf16 GEMM and run torch's bf16 matmul through a
scalar fallback 5-50x slower than sgemm. With ``fast_cpu`` the bf16 operands are multiplied as fp32 copies (sgemm)
and each product is rounded once to bf16. That is what a bf16 GEMM does up to summation order, but the order change
moves single elements by one ulp and the iterations amplify it: the output is a different (equally good)
approximation, not upstream's bits (table in docs/optimizers.md). Off-CPU tensors ignore the flag.
"""

from __future__ import annotations

import importlib.util
import logging

from torch import Tensor

logger = logging.getLogger(__name__)

# Polar Express (Amsel et al., arXiv 2505.16932), 5 steps, safety 2e-2, cushion 2; the 1.02 safety factor is applied
# in the normalisation instead of in the coefficients.
POLAR_EXPRESS_COEFFS: tuple[tuple[float, float, float], ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

# Quintic Newton-Schulz with one tuned coefficient triple per step ("NS5", upstream use_polar_express=False).
NS5_COEFFS: tuple[tuple[float, float, float], ...] = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)

# Keller Jordan's fixed quintic coefficients (modded-nanogpt Muon), iterated ``steps`` times.
KJ_COEFFS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)

METHODS = ("polar_express", "newton_schulz", "newton_schulz_kj")


def _check(x: Tensor) -> None:
    if x.ndim not in (2, 3):
        raise ValueError(f"orthogonalize expects a 2-D or batched 3-D tensor, got shape {tuple(x.shape)}")


class _Matmul:
    """The bf16 product used by the iterations: torch's bf16 matmul (exact), or fp32 sgemm rounded once (fast CPU).

    ``op(t)`` prepares a bf16 tensor as an operand (an fp32 copy on the fast path, made once per use site) and
    ``mm(a, b)`` multiplies two prepared operands back to bf16.
    """

    def __init__(self, x: Tensor, fast_cpu: bool) -> None:
        self.fast = fast_cpu and x.device.type == "cpu"

    def op(self, t: Tensor) -> Tensor:
        return t.float() if self.fast else t

    def mm(self, a: Tensor, b: Tensor) -> Tensor:
        return (a @ b).bfloat16() if self.fast else a @ b


def _frobenius(x: Tensor) -> Tensor:
    return x.norm(dim=(-2, -1), keepdim=True)


def polar_express(x: Tensor, eps: float = 1e-7, fast_cpu: bool = False) -> Tensor:
    """Polar Express, 5 steps, upstream's form: works on the short side without transposing (tall: ``XᵀX``, right
    multiply; wide: ``XXᵀ``, left multiply), ``B = b·A + c·(A @ A)``."""
    _check(x)
    mm = _Matmul(x, fast_cpu)
    X = x.bfloat16()
    X = X / (_frobenius(X) * 1.02 + eps)
    tall = X.size(-2) > X.size(-1)
    for a, b, c in POLAR_EXPRESS_COEFFS:
        Xo = mm.op(X)
        A = mm.mm(Xo.mT, Xo) if tall else mm.mm(Xo, Xo.mT)
        Ao = mm.op(A)
        B = b * A + c * mm.mm(Ao, Ao)
        X = a * X + (mm.mm(Xo, mm.op(B)) if tall else mm.mm(mm.op(B), Xo))
    return X


def _quintic_ns(x: Tensor, coeffs: tuple[tuple[float, float, float], ...], eps: float, fast_cpu: bool,
                scale_first: bool) -> Tensor:
    """Newton-Schulz loop: transpose tall input to wide, normalise by ‖X‖_F, iterate, transpose back.

    ``scale_first``: ``B = b·A + (c·A) @ A`` (Keller Jordan's ``c * A @ A``) instead of ``b·A + c·(A @ A)`` (NS5).
    """
    _check(x)
    mm = _Matmul(x, fast_cpu)
    X = x.bfloat16()
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (_frobenius(X) + eps)
    for a, b, c in coeffs:
        Xo = mm.op(X)
        A = mm.mm(Xo, Xo.mT)
        Ao = mm.op(A)
        B = b * A + (mm.mm(mm.op(c * A), Ao) if scale_first else c * mm.mm(Ao, Ao))
        X = a * X + mm.mm(mm.op(B), Xo)
    return X.mT if tall else X


def newton_schulz(x: Tensor, eps: float = 1e-7, fast_cpu: bool = False) -> Tensor:
    """Quintic Newton-Schulz with the five per-step coefficient triples of upstream NS5."""
    return _quintic_ns(x, NS5_COEFFS, eps, fast_cpu, scale_first=False)


def newton_schulz_kj(x: Tensor, steps: int = 5, eps: float = 1e-7, fast_cpu: bool = False) -> Tensor:
    """Keller Jordan's Newton-Schulz: the fixed triple (3.4445, -4.7750, 2.0315) applied ``steps`` times, with the
    reference's ``B = b·A + (c·A) @ A``."""
    if steps < 1:
        raise ValueError(f"newton_schulz_kj needs steps >= 1, got {steps}")
    return _quintic_ns(x, (KJ_COEFFS,) * steps, eps, fast_cpu, scale_first=True)


def orthogonalize(
    x: Tensor, method: str = "polar_express", steps: int = 5, eps: float = 1e-7, fast_cpu: bool = False
) -> Tensor:
    """Dispatch to one orthogonaliser. ``steps`` applies only to ``newton_schulz_kj``; PE5 and NS5 are fixed
    5-step schedules (their coefficients are tuned per step, so a different count would not be the same method).
    ``fast_cpu`` opts into the sgemm CPU path (not upstream's bits; see the module docstring)."""
    if method == "polar_express":
        return polar_express(x, eps, fast_cpu)
    if method == "newton_schulz":
        return newton_schulz(x, eps, fast_cpu)
    if method == "newton_schulz_kj":
        return newton_schulz_kj(x, steps, eps, fast_cpu)
    raise ValueError(f"unknown orthogonalization method {method!r}; valid: {', '.join(METHODS)}")


def note_eager_fallback(owner: str, **flags: bool) -> None:
    """One log line for upstream kernel options this package accepts but runs eagerly (``use_triton``,
    ``use_gram_newton_schulz``, ``triton_post_ortho``): the eager bf16 path computes the same maths."""
    wanted = [name for name, on in flags.items() if on]
    if not wanted:
        return
    triton = "installed" if importlib.util.find_spec("triton") is not None else "not installed"
    logger.info(
        "%s: %s requested; neobert_pt has no Triton/Gram-NS orthogonaliser kernels (triton %s), so the eager bf16 "
        "path runs (same maths as upstream's eager code)", owner, "+".join(wanted), triton,
    )
