"""Orthogonalisers: singular values in each method's band, batching, orientation, zero rows, dtype, errors."""

from __future__ import annotations

import pytest
import torch

from neobert_pt.optim.orthogonalize import METHODS, newton_schulz, newton_schulz_kj, orthogonalize, polar_express

# Singular-value bands for well-conditioned rectangular input (aspect >= 2); measured on bf16 CPU. Keller Jordan's
# fixed coefficients trade accuracy for speed, so its band is wide and sits below 1 on average.
BANDS = {"polar_express": (0.58, 1.16), "newton_schulz": (0.43, 1.16), "newton_schulz_kj": (0.6, 1.2)}
SHAPES = [(24, 48), (48, 24), (16, 128), (4, 24, 48), (3, 48, 24)]


def _svdvals(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(x.float())


def _polar(x: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return u @ vh


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_singular_values_in_band_and_close_to_polar_factor(method: str, shape: tuple, scale: float) -> None:
    torch.manual_seed(0)
    x = torch.randn(*shape) * scale
    out = orthogonalize(x, method)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    lo, hi = BANDS[method]
    s = _svdvals(out)
    assert lo <= s.min() and s.max() <= hi, (s.min().item(), s.max().item())
    # Direction: cosine with the exact polar factor U·Vᵀ (KJ's singular values average ~0.77, direction still right).
    cos = torch.nn.functional.cosine_similarity(out.double().flatten(-2), _polar(x).flatten(-2), dim=-1)
    assert cos.min() >= (0.95 if method == "newton_schulz_kj" else 0.98)


@pytest.mark.parametrize("method", METHODS)
def test_square_near_singular_input_stays_bounded(method: str) -> None:
    """Square Gaussian matrices have tiny singular values that cannot be lifted to 1 in 5 steps; none exceed ~1.2."""
    torch.manual_seed(1)
    s = _svdvals(orthogonalize(torch.randn(3, 32, 32), method))
    assert s.max() <= 1.2 and 0.8 <= s.median() <= 1.1


@pytest.mark.parametrize("method", METHODS)
def test_batched_equals_per_matrix_and_transpose_equivariant(method: str) -> None:
    torch.manual_seed(2)
    x = torch.randn(5, 24, 40)
    batched = orthogonalize(x, method)
    assert torch.equal(batched, torch.stack([orthogonalize(m, method) for m in x]))
    assert torch.equal(orthogonalize(x.mT, method), batched.mT)


@pytest.mark.parametrize("method", METHODS)
def test_zero_rows_and_columns_stay_zero(method: str) -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 16, 40)
    x[0, 3] = 0
    x[1, :, 7] = 0
    out = orthogonalize(x, method)
    assert torch.count_nonzero(out[0, 3]) == 0 and torch.count_nonzero(out[1, :, 7]) == 0
    assert torch.count_nonzero(orthogonalize(torch.zeros(8, 12), method)) == 0


@pytest.mark.parametrize("method", METHODS)
def test_power_of_two_scaling_is_exact(method: str) -> None:
    torch.manual_seed(4)
    x = torch.randn(24, 40)
    assert torch.equal(orthogonalize(x * 1024, method), orthogonalize(x, method))


def test_named_functions_match_dispatch_and_steps_matter() -> None:
    torch.manual_seed(5)
    x = torch.randn(16, 48)
    assert torch.equal(polar_express(x), orthogonalize(x, "polar_express"))
    assert torch.equal(newton_schulz(x), orthogonalize(x, "newton_schulz"))
    assert torch.equal(newton_schulz_kj(x, 3), orthogonalize(x, "newton_schulz_kj", steps=3))
    # More KJ iterations move the spectrum towards the method's fixed-point band; 1 step is far from it.
    assert _svdvals(newton_schulz_kj(x, 1)).min() < 0.5 < _svdvals(newton_schulz_kj(x, 8)).min()


def test_invalid_input_raises() -> None:
    with pytest.raises(ValueError, match="unknown orthogonalization"):
        orthogonalize(torch.randn(4, 4), "svd")
    with pytest.raises(ValueError, match="2-D or batched 3-D"):
        orthogonalize(torch.randn(2, 2, 4, 4))
    with pytest.raises(ValueError, match="steps >= 1"):
        newton_schulz_kj(torch.randn(4, 4), 0)
