"""The fused Dana-Star kernel's transcendental-free clock T^(1-kappa) (dana_fused.clock_power) against float64.

The function is plain torch ops, so it is checked here eagerly in fp32 (what the compiled kernel computes, up to
inductor's operation order); the compiled kernel itself is checked against the fixture in test_dana_fused.py.
"""

from __future__ import annotations

import pytest
import torch

from neobert_pt.optim import dana_fused


def clock_fp32(T: torch.Tensor, beta: float) -> torch.Tensor:
    q = [torch.tensor(x, dtype=torch.float32) for x in dana_fused.clock_constants(beta)]
    return dana_fused.clock_power(T, q)


@pytest.mark.parametrize("kappa", [0.0, 0.5, 0.75, 0.85, 0.9, 1.0])
def test_clock_matches_float64_pow_over_the_whole_range(kappa):
    beta = 1.0 - kappa
    gen = torch.Generator().manual_seed(0)
    # every binade from 1 to 2^31.5, dense near the halving thresholds and their neighbours, and exact powers of 2
    T = torch.cat([
        torch.exp2(torch.rand(200_000, generator=gen, dtype=torch.float64) * 31.5),
        torch.linspace(1.0, 4.0, 30_001, dtype=torch.float64),
        torch.exp2(torch.arange(0, 64, dtype=torch.float64) / 2.0),
    ]).float()
    T = T[T < 2.0**31.5]
    got = clock_fp32(T, beta).double()
    exact = T.double() ** beta
    rel = ((got - exact).abs() / exact).max().item()
    # fp32 pow itself is off by up to ~1.7e-7 here; the ladder adds one rounding per halving taken
    assert rel <= 5e-7, f"kappa={kappa}: max relative error {rel:.3g}"


def test_steps_beyond_the_ladder_use_the_eager_kernel(monkeypatch):
    """At t >= MAX_FUSED_STEP the reduced T could leave [1, sqrt 2): the fused optimizer must not call the kernel."""
    from neobert_pt.optim.dana import DanaStar

    def refuse(*args, **kwargs):
        raise AssertionError("run_fused called beyond MAX_FUSED_STEP")

    runs = []
    for fused in (False, True):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(8, 4))
        opt = DanaStar([w], lr=1e-2, clipsnr=2.0, fused=False)  # state created by one eager step on both runs
        w.grad = torch.randn(8, 4)
        opt.step()
        opt.fused = fused
        opt.state[w]["step"] = dana_fused.MAX_FUSED_STEP - 1
        w.grad = torch.randn(8, 4)
        with monkeypatch.context() as patch:
            patch.setattr(dana_fused, "run_fused", refuse)
            opt.step()  # t = MAX_FUSED_STEP
        runs.append(w.detach().clone())
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
