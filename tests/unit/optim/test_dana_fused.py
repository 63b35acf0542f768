"""The torch.compile'd DANA update (dana_fused.py) against docs/specs/dana.md's reference fixture and the eager kernels.

Compiling costs tens of seconds on a small CPU the first time (inductor caches it on disk afterwards), so the
whole module shares one compile per kernel: every parameter shape runs through the same dynamic-shape kernel.
"""

from __future__ import annotations

import pytest
import torch

from neobert_pt.optim import dana_fused
from neobert_pt.optim.dana import ADana, DanaStar
from tests.unit.optim.test_dana_reference import FIXTURE, TOLERANCE  # noqa: F401  (same fixture, same bar)

pytestmark = [pytest.mark.skipif(not dana_fused.compiled_available()[0], reason="torch.compile unavailable"),
              pytest.mark.slow]  # the first compile of the two kernels: ~30 s of CPU on a cold inductor cache


@pytest.fixture(scope="module")
def reference() -> dict:
    import json

    with open(FIXTURE) as fh:
        return json.load(fh)


def run(reference: dict, set_name: str, variant: str, fused: bool):
    proto = reference["protocol"]
    hp = proto["hyperparameter_sets"][set_name]
    w = torch.nn.Parameter(torch.tensor(proto["W0"], dtype=torch.float32))
    b = torch.nn.Parameter(torch.tensor(proto["b0"], dtype=torch.float32))
    groups = [{"params": [w], "weight_decay": hp["wd_W"]}, {"params": [b], "weight_decay": hp["wd_b"]}]
    cls = DanaStar if variant.startswith("dana-star") else ADana
    opt = cls(groups, lr=hp["peak_lr"], delta=hp["delta"], kappa=hp["kappa"], epsilon=hp["eps"],
              clipsnr=hp["clipsnr"] if variant.endswith("mk4") else None, wd_decaying=hp["wd_decaying"],
              wd_ts=hp["wd_ts"], gamma_3_factor=hp["gamma_3_factor"], foreach=True, fused=fused)
    w_traj, b_traj = [], []
    for k in range(proto["steps"]):
        for group in opt.param_groups:
            group["lr"] = hp["peak_lr"] * hp["lr_mult"][k]
        w.grad = torch.tensor(proto["grad_W"][k], dtype=torch.float32)
        b.grad = None if proto["grad_b"][k] is None else torch.tensor(proto["grad_b"][k], dtype=torch.float32)
        opt.step()
        w_traj.append(w.detach().clone())
        b_traj.append(b.detach().clone())
    return opt, torch.stack(w_traj), torch.stack(b_traj)


@pytest.mark.parametrize("variant", ["adana", "dana-mk4", "dana-star", "dana-star-mk4"])
@pytest.mark.parametrize("set_name", ["paper", "stress"])
def test_fused_matches_reference_fixture(reference, set_name, variant):
    _, w_traj, b_traj = run(reference, set_name, variant, fused=True)
    assert "adana" not in dana_fused._DISABLED and "dana_star" not in dana_fused._DISABLED, dana_fused._DISABLED
    expected = reference["results"][set_name][variant]
    tol = TOLERANCE[torch.float32]
    assert (w_traj.double() - torch.tensor(expected["W_after_step"], dtype=torch.float64)).abs().max() <= tol
    assert (b_traj.double() - torch.tensor(expected["b_after_step"], dtype=torch.float64)).abs().max() <= tol


@pytest.mark.parametrize("cls", [ADana, DanaStar])
def test_fused_matches_eager_on_model_shapes(cls):
    """Many shapes through one dynamic kernel, with states compared after several steps (no recompiles)."""
    shapes = [(64, 32), (96, 32), (32,), (7, 5, 3), (1000,)]
    runs = {}
    for fused in (False, True):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        opt = cls(params, lr=1e-2, weight_decay=0.1, clipsnr=2.0, wd_decaying=True, wd_ts=3.0, foreach=True,
                  fused=fused)
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) * torch.rand((), generator=gen)
            opt.step()
        runs[fused] = (params, opt)
    for p_eager, p_fused in zip(runs[False][0], runs[True][0], strict=True):
        torch.testing.assert_close(p_fused, p_eager, rtol=2e-6, atol=2e-6)
        for name, value in runs[False][1].state[p_eager].items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(runs[True][1].state[p_fused][name], value, rtol=2e-6, atol=2e-6)
