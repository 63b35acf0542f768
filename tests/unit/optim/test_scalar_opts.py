"""The shared scalar-group steps (neobert_pt/optim/scalar_opts.py) against torch's fused AdamW kernel.

``adamw_step`` goes through the public ``torch.optim.adamw.adamw(..., fused=True)``, which increments the step
counters and calls ``torch._fused_adamw_``. The package never calls that private kernel; this test does, to prove
both ``lr`` forms reach it unchanged: ``tensor_lr=True`` (Muon, Dion2) and ``tensor_lr=False`` with counters at
t−1 (Dion's group step), bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from neobert_pt.optim.scalar_opts import adamw_step, restore_step_counter

HYPER = dict(beta1=0.9, beta2=0.95, weight_decay=0.1, eps=1e-8)


def _tensors(dtype: torch.dtype, seed: int) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(33,), (4, 7), (1,)]
    w = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    g = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    m = [0.1 * torch.randn(s, generator=gen).to(dtype) for s in shapes]
    v = [0.01 * torch.rand(s, generator=gen).to(dtype) for s in shapes]
    return [w, g, m, v]


@pytest.mark.parametrize("tensor_lr", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_step_is_the_fused_kernel_bit_for_bit(dtype: torch.dtype, tensor_lr: bool) -> None:
    for seed, t in enumerate((1, 2, 7, 300)):
        lr = 0.0123 * (seed + 1)
        ours = _tensors(dtype, seed)
        ref = [[x.clone() for x in xs] for xs in ours]
        steps = [torch.full((), float(t - 1)) for _ in ours[0]]
        adamw_step(*ours, steps, lr=lr, tensor_lr=tensor_lr, **HYPER)
        kernel_lr = torch.tensor(lr, dtype=torch.float32) if tensor_lr else lr
        ref_steps = [torch.full((), float(t)) for _ in ref[0]]
        torch._fused_adamw_(*ref, [], ref_steps, lr=kernel_lr, amsgrad=False, maximize=False, **HYPER)
        assert [s.item() for s in steps] == [float(t)] * len(steps)
        for got, want in zip(ours, ref, strict=True):
            for a, b in zip(got, want, strict=True):
                assert torch.equal(a, b), (dtype, tensor_lr, t)


def test_the_two_lr_forms_round_differently() -> None:
    """Why ``tensor_lr`` exists: the fp32-tensor and Python-float lr give different bits in some cases, and each
    optimizer keeps the form its upstream uses."""
    differs = False
    for seed in range(20):
        a, b = _tensors(torch.float32, seed), _tensors(torch.float32, seed)
        adamw_step(*a, [torch.zeros(()) for _ in a[0]], lr=0.0137 + seed * 1e-3, tensor_lr=True, **HYPER)
        adamw_step(*b, [torch.zeros(()) for _ in b[0]], lr=0.0137 + seed * 1e-3, tensor_lr=False, **HYPER)
        differs |= not all(torch.equal(x, y) for x, y in zip(a[0], b[0], strict=True))
    assert differs


def test_restore_step_counter_keeps_fp32_and_fills_a_missing_one() -> None:
    state = {"step": torch.tensor(300.0).bfloat16(), "other": torch.zeros(2)}
    restore_step_counter(state, "step", torch.device("cpu"), group_step=7)
    assert state["step"].dtype == torch.float32 and state["step"].item() == 300.0
    empty: dict[str, torch.Tensor] = {}
    restore_step_counter(empty, "step_dev", torch.device("cpu"), group_step=7)
    assert empty["step_dev"].dtype == torch.float32 and empty["step_dev"].shape == () and empty["step_dev"].item() == 7
