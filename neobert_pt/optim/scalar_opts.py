"""Element-wise update rules shared by the orthonormal optimizers (the non-matrix groups of Muon, Dion2 and Dion).

One implementation of each, in upstream ``microsoft/dion``'s arithmetic, so the optimizers step their scalar groups
identically (the other shared pieces, meshes, shards and the work split, are in ``orthonormal.py``):

* :func:`adamw_step`: decoupled AdamW through torch's public fused functional
  (``torch.optim.adamw.adamw(..., fused=True)``, which increments the fp32 step counters and then runs the fused
  kernel). Muon and Dion2 keep a per-parameter counter, so a parameter that skipped steps (``grad is None``) gets
  its own bias correction, as in ``torch.optim.AdamW`` and upstream, and pass ``lr`` as an fp32 tensor; Dion
  passes counters holding the group step and a Python-float ``lr``, as upstream Dion calls the kernel (the two
  ``lr`` forms round differently in the kernel, so each optimizer keeps its upstream's).
* :func:`lion_step`: Lion with every scalar that multiplies a (possibly bf16) tensor carried as an fp32 0-d tensor,
  which keeps it at fp32 precision (a Python float handed to a ``torch._foreach_*`` op is rounded to the tensor
  dtype first: ``1 - 0.02·0.1`` would become ``0.99609375`` in bf16).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.adamw import adamw as _adamw_functional


def f32(value: float, device: torch.device | str = "cpu") -> Tensor:
    """An fp32 0-d tensor holding ``value`` on ``device``, made by a fill (no host-to-device copy, no sync).

    Used as a scalar operand it keeps fp32 precision whatever the other tensor's dtype."""
    return torch.full((), float(value), dtype=torch.float32, device=device)


def restore_step_counter(state: dict[str, Tensor], key: str, device: torch.device, group_step: int) -> None:
    """After ``load_state_dict``: keep a per-parameter AdamW step counter ``state[key]`` an fp32 0-d tensor on
    ``device`` (torch casts floating state to the param dtype; a bf16 counter would stop at 256). A checkpoint
    without one (saved before per-parameter counters) gets the group's step count."""
    step = state.get(key)
    state[key] = f32(group_step, device) if step is None else step.to(dtype=torch.float32, device=device)


def adamw_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    cautious_wd: bool = False,
    tensor_lr: bool = True,
) -> None:
    """One AdamW step: ``steps`` (fp32 0-d tensors on each param's device, one tensor object per param) are
    incremented, then ``W ← W·(1−ηλ) − η/(1−β1ᵗ) · m / (sqrt(v)/sqrt(1−β2ᵗ) + ε)`` per parameter, with its own ``t``.
    All four tensors of a parameter must share one dtype (the fused kernel's requirement).

    ``tensor_lr``: pass ``lr`` to the kernel as an fp32 0-d tensor (upstream Muon/Dion2, the kernel's ``tensor_lr``
    overload) or, when False, as the Python float (upstream Dion).
    ``cautious_wd`` (arXiv 2510.12402) then gives back the decay on entries where the new momentum and the old
    weight disagree in sign, upstream's post-kernel correction."""
    if not params:
        return
    lr_t = f32(lr, params[0].device)
    old = [w.clone() for w in params] if cautious_wd and weight_decay else None
    _adamw_functional(
        params, grads, exp_avgs, exp_avg_sqs, [], steps, fused=True, amsgrad=False, beta1=beta1, beta2=beta2,
        lr=lr_t if tensor_lr else lr, weight_decay=weight_decay, eps=eps, maximize=False,
    )
    if old is not None:
        signs = torch._foreach_mul(exp_avgs, old)
        correction = torch._foreach_mul(old, [(s < 0).to(w.dtype) for s, w in zip(signs, old, strict=True)])
        torch._foreach_mul_(correction, lr_t * weight_decay)
        torch._foreach_add_(params, correction)


def cautious_decay(params: list[Tensor], updates: list[Tensor], coeff: Tensor) -> None:
    """``W ← W − coeff·W·[W·U ≥ 0]``: decoupled decay only where the update and the weight agree in sign."""
    masks = torch._foreach_mul(params, updates)
    torch._foreach_sign_(masks)
    torch._foreach_add_(masks, 1)
    torch._foreach_clamp_max_(masks, 1)
    terms = torch._foreach_mul(params, masks)
    torch._foreach_mul_(terms, coeff)
    torch._foreach_sub_(params, terms)


def lion_step(
    params: list[Tensor],
    grads: list[Tensor],
    momenta: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    cautious_wd: bool = False,
) -> None:
    """One Lion step, upstream's op order: ``U = sign(lerp(M, G, 1−β1))``; ``M ← lerp(M, G, 1−β2)``;
    ``W ← W·(1−ηλ)``; ``W ← W − bf16(η·U)`` (the product in the param dtype, then subtracted)."""
    if not params:
        return
    n = len(params)
    device = params[0].device
    lr_t = f32(lr, device)
    grads = [g.to(m.dtype) for g, m in zip(grads, momenta, strict=True)]
    update = torch._foreach_lerp(momenta, grads, [1 - f32(beta1, device)] * n)
    torch._foreach_sign_(update)
    torch._foreach_lerp_(momenta, grads, [1 - f32(beta2, device)] * n)
    if cautious_wd:
        cautious_decay(params, update, lr_t * f32(weight_decay, device))
    else:
        torch._foreach_mul_(params, 1 - lr_t * f32(weight_decay, device))
    torch._foreach_mul_(update, lr_t)
    torch._foreach_sub_(params, update)
