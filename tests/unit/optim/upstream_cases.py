"""The differential cases of Muon and Dion2 against upstream ``microsoft/dion`` (issue 14), shared by
``test_upstream_differential.py`` and the fixture generator ``tests/assets/specs/make_optim_differential.py``.

Everything a case needs is derived from its seed with numpy's legacy ``RandomState`` (a stream numpy keeps stable
across versions), so the stored fixture holds only results, never inputs. A case is one matrix (2-D or 3-D) with a
gradient every step, optionally a same-shape matrix that never gets one, and optionally a scalar group (AdamW or
Lion: a bias vector and a small 2-D table) whose bias skips the first step (``grad=None``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

# (shape, kind); up to 256x512. Fractions below are chosen so that fraction * N is never an integer for them.
SHAPES: tuple[tuple[tuple[int, ...], str], ...] = (
    ((128, 256), "wide"), ((256, 128), "tall"), ((256, 512), "wide"), ((512, 256), "tall"), ((160, 160), "square"),
    ((1, 300), "1-row"), ((300, 1), "1-col"), ((37, 101), "wide"), ((96, 40), "tall"), ((3, 32, 64), "3-D"),
    ((2, 96, 48), "3-D"), ((64, 64), "square"),
)
FRACTIONS = (0.31, 0.13, 0.57, 0.77, 1.0)
ADJUST = ("spectral_norm", "rms_norm", None)


@dataclass(frozen=True)
class Case:
    name: str
    optimizer: str  # "dion2" | "muon"
    shape: tuple[int, ...]
    dtype: str  # "float32" | "bfloat16"
    seed: int
    steps: int
    kwargs: dict[str, Any] = field(hash=False)
    nograd_matrix: bool = False
    scalar: str | None = None  # "adamw" | "lion" | None


def cases() -> list[Case]:
    """48 cases covering every shape kind, both dtypes, every adjust_lr and orthogonaliser choice, Nesterov on/off,
    weight decay on/off, Muon's cautious weight decay, non-integer fraction·N, params without grad, and the scalar
    algorithms."""
    rs = np.random.RandomState(20261203)
    out = []
    for i in range(48):
        optimizer = "dion2" if i % 2 == 0 else "muon"
        shape, kind = SHAPES[(i // 2) % len(SHAPES)]
        dtype = "bfloat16" if (i // 4) % 2 else "float32"
        kwargs: dict[str, Any] = dict(
            lr=float(rs.choice([0.01, 0.02, 0.005])),
            weight_decay=float(rs.choice([0.0, 0.01, 0.1])),
            adjust_lr=ADJUST[(i // 2) % 3],
            use_polar_express=bool((i // 6) % 2 == 0),
        )
        if optimizer == "dion2":
            kwargs.update(fraction=FRACTIONS[(i // 2) % len(FRACTIONS)], ef_decay=float(rs.choice([0.95, 0.9, 1.0])))
            scalar = ("adamw", "lion", None)[(i // 2) % 3]
        else:
            kwargs.update(mu=float(rs.choice([0.95, 0.9])), nesterov=bool((i // 2) % 2))
            if i % 8 == 1:
                kwargs.update(cautious_wd=True, weight_decay=0.1)
            scalar = ("adamw", None)[(i // 2) % 2]
        big = math.prod(shape) >= 128 * 256
        name = f"{i:02d}_{optimizer}_{kind}_{'x'.join(map(str, shape))}_{'bf16' if dtype == 'bfloat16' else 'fp32'}"
        out.append(Case(name, optimizer, shape, dtype, seed=1000 + i, steps=2 if big else 3, kwargs=kwargs,
                        nograd_matrix=i % 5 == 0, scalar=scalar))
    return out


def _randn(rs: np.random.RandomState, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(rs.standard_normal(shape).astype(np.float32)).to(dtype)


def make_problem(case: Case) -> tuple[dict[str, nn.Parameter], list[dict[str, torch.Tensor | None]]]:
    """Initial parameters and per-step gradients (``None`` where a param gets no gradient that step)."""
    dtype = getattr(torch, case.dtype)
    rs = np.random.RandomState(case.seed)
    params = {"w": _randn(rs, case.shape, dtype) * 0.05}
    if case.nograd_matrix:
        params["w_nograd"] = _randn(rs, case.shape, dtype) * 0.05
    if case.scalar:
        params["bias"] = _randn(rs, (case.shape[-2],), dtype) * 0.05
        params["table"] = _randn(rs, (11, 24), dtype) * 0.05
    grads = []
    for step in range(case.steps):
        g: dict[str, torch.Tensor | None] = {"w": _randn(rs, case.shape, dtype)}
        if case.nograd_matrix:
            g["w_nograd"] = None
        if case.scalar:
            bias = _randn(rs, (case.shape[-2],), dtype)
            g["bias"] = None if step == 0 else bias
            g["table"] = _randn(rs, (11, 24), dtype)
        grads.append(g)
    return {k: nn.Parameter(v.clone()) for k, v in params.items()}, grads


def build(case: Case, dion2_cls: type, muon_cls: type, params: dict[str, nn.Parameter],
          newton_schulz_func: Callable | None = None) -> torch.optim.Optimizer:
    """The same construction for ours and upstream: upstream's constructor keywords and group keys only."""
    matrices = [params["w"]] + ([params["w_nograd"]] if case.nograd_matrix else [])
    groups: list[dict[str, Any]] = [{"params": matrices}]
    if case.scalar:
        groups.append({"params": [params["bias"], params["table"]], "algorithm": case.scalar, "weight_decay": 0.01})
    kwargs = dict(case.kwargs)
    if newton_schulz_func is not None:
        kwargs["newton_schulz_func"] = newton_schulz_func
    cls = dion2_cls if case.optimizer == "dion2" else muon_cls
    return cls(groups, **kwargs)


def run(case: Case, dion2_cls: type, muon_cls: type,
        newton_schulz_func: Callable | None = None) -> dict[str, torch.Tensor]:
    """Final params and matrix momentum after ``case.steps`` steps."""
    params, grads = make_problem(case)
    opt = build(case, dion2_cls, muon_cls, params, newton_schulz_func)
    for g in grads:
        for k, p in params.items():
            p.grad = None if g[k] is None else g[k].clone()
        opt.step()
    out = {k: p.detach().clone() for k, p in params.items()}
    out["momentum"] = opt.state[params["w"]]["momentum"].clone()
    return out


def tolerance_ok(ours: torch.Tensor, ref: torch.Tensor, steps: int) -> tuple[bool, float]:
    """fp32: |Δ| ≤ 1e-6. bf16: each element within ``steps`` bf16 roundings (ulps of the reference value)."""
    if ours.dtype != ref.dtype or ours.shape != ref.shape:
        return False, float("inf")
    diff = (ours.double() - ref.double()).abs()
    if ref.dtype == torch.float32:
        worst = diff.max().item() if diff.numel() else 0.0
        return worst <= 1e-6, worst
    mag = ref.double().abs().clamp_min(2.0 ** -126)
    ulp = torch.exp2(torch.floor(torch.log2(mag)) - 7)
    ratio = (diff / ulp).max().item() if diff.numel() else 0.0
    return ratio <= steps, ratio
