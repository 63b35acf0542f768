"""Approximate orthogonalisation (polar factor ``U·Vᵀ``) for Muon and Dion2.

All routines take a 2-D ``(r, c)`` or batched 3-D ``(B, r, c)`` tensor and return a bf16 tensor of the same shape
whose singular values are pushed towards 1. Every op runs in bf16 with the operation order of the upstream
``microsoft/dion`` eager code, so the optimizers built on top reproduce its CPU reference numbers (spec
``dion2_muonclip.md`` §1.5, fixture §2; on CPU the bf16 products go through sgemm, see :func:`_mm`). Zero
rows/columns stay exactly zero, which distributed padding relies on. These are approximations: singular values
land in about [0.58, 1.15] (PE5) and [0.43, 1.15] (NS5).
"""

from __future__ import annotations

from torch import Tensor

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


def _operand(x: Tensor) -> Tensor:
    """``x`` as a matmul operand: fp32 on CPU (see :func:`_mm`), the bf16 tensor itself elsewhere."""
    return x.float() if x.device.type == "cpu" else x


def _mm(a: Tensor, b: Tensor) -> Tensor:
    """bf16 product of two :func:`_operand` tensors: fp32 accumulation, one rounding to bf16 (what bf16 GEMMs do).

    CPUs without native bf16 GEMM run torch's bf16 matmul through a scalar fallback that is 5-50x slower than
    sgemm (and far worse under thread contention), so there the operands are fp32 copies of the bf16 values and the
    product is rounded once. Only the summation order differs from the fallback, which moves about 1 output element
    in 30,000 by one bf16 ulp. Each operand is converted once per iteration, however often it is used.
    """
    return (a @ b).bfloat16()


def _frobenius(x: Tensor) -> Tensor:
    return x.norm(dim=(-2, -1), keepdim=True)


def polar_express(x: Tensor, eps: float = 1e-7) -> Tensor:
    """Polar Express, 5 steps. Works on the short side without transposing (tall: ``XᵀX``; wide: ``XXᵀ``).

    ``c * (A @ A)`` (not ``(c * A) @ A``) is the op order that reproduces upstream's bf16 numbers exactly.
    """
    _check(x)
    X = x.bfloat16()
    X = X / (_frobenius(X) * 1.02 + eps)
    if X.size(-2) > X.size(-1):
        for a, b, c in POLAR_EXPRESS_COEFFS:
            Xo = _operand(X)
            A = _mm(Xo.mT, Xo)
            Ao = _operand(A)
            B = b * A + c * _mm(Ao, Ao)
            X = a * X + _mm(Xo, _operand(B))
    else:
        for a, b, c in POLAR_EXPRESS_COEFFS:
            Xo = _operand(X)
            A = _mm(Xo, Xo.mT)
            Ao = _operand(A)
            B = b * A + c * _mm(Ao, Ao)
            X = a * X + _mm(_operand(B), Xo)
    return X


def _quintic_ns(x: Tensor, coeffs: tuple[tuple[float, float, float], ...], eps: float) -> Tensor:
    """Shared Newton-Schulz loop: transpose tall input to wide, normalise by ‖X‖_F, iterate, transpose back."""
    _check(x)
    X = x.bfloat16()
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (_frobenius(X) + eps)
    for a, b, c in coeffs:
        Xo = _operand(X)
        A = _mm(Xo, Xo.mT)
        Ao = _operand(A)
        B = b * A + c * _mm(Ao, Ao)
        X = a * X + _mm(_operand(B), Xo)
    return X.mT if tall else X


def newton_schulz(x: Tensor, eps: float = 1e-7) -> Tensor:
    """Quintic Newton-Schulz with the five per-step coefficient triples of upstream NS5."""
    return _quintic_ns(x, NS5_COEFFS, eps)


def newton_schulz_kj(x: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Keller Jordan's Newton-Schulz: the fixed triple (3.4445, -4.7750, 2.0315) applied ``steps`` times."""
    if steps < 1:
        raise ValueError(f"newton_schulz_kj needs steps >= 1, got {steps}")
    return _quintic_ns(x, (KJ_COEFFS,) * steps, eps)


def orthogonalize(x: Tensor, method: str = "polar_express", steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Dispatch to one orthogonaliser. ``steps`` applies only to ``newton_schulz_kj``; PE5 and NS5 are fixed
    5-step schedules (their coefficients are tuned per step, so a different count would not be the same method)."""
    if method == "polar_express":
        return polar_express(x, eps)
    if method == "newton_schulz":
        return newton_schulz(x, eps)
    if method == "newton_schulz_kj":
        return newton_schulz_kj(x, steps, eps)
    raise ValueError(f"unknown orthogonalization method {method!r}; valid: {', '.join(METHODS)}")
