"""Muon for hidden matrices plus AdamW for everything else, in one optimizer; and the ``muonclip`` builder.

Each param group has an ``algorithm`` key: ``"muon"`` or ``"adamw"``. A Muon step per matrix ``W`` (m×n) is

    M ← μ·M + G;  U = G + μ·M (Nesterov) or M;  O = orthogonalize(bf16(U));  W ← W·(1 − ηλ) − bf16(η̃·O)

where ``η̃`` rescales the LR from the *projection* shape (``adjust_lr``). A group with ``split_rows = s`` (fused QKV)
is treated as ``s`` independent ``(m/s)×n`` matrices: each block is orthogonalised and scaled on its own. With the
constructor's (upstream's) defaults this is upstream ``dion.Muon``'s eager step (``docs/specs/dion2_muonclip.md`` §3.1)
with its rounding points: μ, ``1 − ηλ`` and ``η̃`` are fp32 0-d tensors made by device fills (never a host sync),
and the AdamW groups count steps per parameter (``tests/unit/optim/test_upstream_differential.py``).

Distributed: with a ``ProcessGroup`` (DDP, replicated params, grads already averaged) every rank holds every matrix;
the orthogonalisation of each same-shape batch is split across ranks and all-gathered, so all ranks apply the same
bits. With a 1-D ``DeviceMesh`` (FSDP2, ``Shard(0)`` DTensor params) each rank all-gathers the bf16 update input,
the same split orthogonalisation runs, and every rank applies the rows of its own shard. The mesh resolution, the
work split, the row ranges and the LR adjustment are the shared ones in ``orthonormal.py``; the AdamW groups step
through ``scalar_opts.py`` (torch's public fused AdamW functional), as Dion2's and Dion's do.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from neobert_pt.optim.orthogonalize import METHODS, note_eager_fallback, orthogonalize
from neobert_pt.optim.orthonormal import (
    adjusted_lr_factor,
    local,
    local_rows,
    resolve_mesh,
    split_orthogonalize,
)
from neobert_pt.optim.qk_clip import build_qk_clip
from neobert_pt.optim.registry import BuiltOptimizer, OptimizerContext
from neobert_pt.optim.scalar_opts import adamw_step, cautious_decay, f32, restore_step_counter

logger = logging.getLogger(__name__)

ALGORITHMS = ("muon", "adamw")
class Muon(torch.optim.Optimizer):
    """Muon (``algorithm="muon"`` groups, matrices) and AdamW (``algorithm="adamw"`` groups) in one instance.

    The constructor takes upstream ``dion.Muon``'s arguments in upstream's order and with its defaults, so the
    reference reproduces with plain arguments; the keyword-only extras are this project's
    (``orthogonalization``, ``ns_steps``, ``split_rows``, ``fast_cpu_orthogonalization``).

    * ``use_polar_express=False`` selects NS5; ``orthogonalization`` (if given) overrides it and also offers
      Keller Jordan's ``newton_schulz_kj`` with ``ns_steps`` iterations; ``newton_schulz_func(x, epsilon=...)``
      overrides both (it must accept 2-D and batched 3-D input).
    * ``use_triton`` / ``use_gram_newton_schulz``: this package has no Triton or Gram Newton-Schulz kernel; the
      eager bf16 path (the same maths) runs and one log line says so.
    * ``flatten=True`` reshapes each ≥3-D param to ``(shape[0], prod(rest))``, param by param (upstream stacks
      same-shape params first and so orthogonalises them jointly, docs/specs/dion2_muonclip.md §1.13; not replicated).
      Without it a ≥3-D param is a batch of matrices over its last two dims.
    * ``cautious_wd`` decays only entries where the update and the weight agree in sign (arXiv 2510.12402).

    Group keys (overridable per group): ``lr``, ``momentum`` (μ; upstream's group key ``mu`` is accepted too),
    ``nesterov``, ``weight_decay`` (decoupled, multiplied by the group LR), ``cautious_wd``, ``adjust_lr``
    (``"spectral_norm"``, ``"rms_norm"``, ``"none"``/``None``), ``flatten``, ``split_rows``, ``orthogonalization``,
    ``ns_steps``, ``fast_cpu_orthogonalization``, ``betas`` (or upstream's ``beta1``/``beta2``) and ``eps`` (or
    ``epsilon``; AdamW's ε and the orthogonaliser's normalisation epsilon, as upstream).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        distributed_mesh: Any = None,
        lr: float = 0.01,
        mu: float = 0.95,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.01,
        cautious_wd: bool = False,
        epsilon: float = 1e-8,
        nesterov: bool = False,
        adjust_lr: str | None = "spectral_norm",
        flatten: bool = False,
        use_gram_newton_schulz: bool = False,
        use_triton: bool = False,
        use_polar_express: bool = True,
        newton_schulz_func: Callable[..., Tensor] | None = None,
        *,
        orthogonalization: str | None = None,
        ns_steps: int = 5,
        split_rows: int = 1,
        fast_cpu_orthogonalization: bool = False,
    ) -> None:
        if orthogonalization is None:
            orthogonalization = "polar_express" if use_polar_express else "newton_schulz"
        note_eager_fallback("Muon", use_triton=use_triton, use_gram_newton_schulz=use_gram_newton_schulz)
        defaults = dict(
            lr=lr,
            momentum=mu,
            nesterov=nesterov,
            weight_decay=weight_decay,
            cautious_wd=cautious_wd,
            betas=tuple(betas),
            eps=epsilon,
            adjust_lr=adjust_lr,
            flatten=flatten,
            orthogonalization=orthogonalization,
            ns_steps=ns_steps,
            split_rows=split_rows,
            fast_cpu_orthogonalization=fast_cpu_orthogonalization,
            algorithm="muon",
            step=0,
        )
        self._orth_fn = newton_schulz_func
        super().__init__(params, defaults)
        # The work split runs over the group under DDP and FSDP2 alike (FSDP2 gathers full matrices first).
        distribution = resolve_mesh(distributed_mesh, "Muon")
        self._group, self._mesh = distribution.group, distribution.mesh
        for group in self.param_groups:
            self._validate(group)
            for p in group["params"]:
                self._init_state(p, group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Accept upstream's group keys (``mu``, ``epsilon``, ``beta1``/``beta2``) as aliases of ours."""
        group = dict(param_group)
        for upstream, ours in (("mu", "momentum"), ("epsilon", "eps")):
            if upstream in group:
                if ours in group:
                    raise ValueError(f"a Muon param group sets both {upstream!r} and {ours!r}; keep one")
                group[ours] = group.pop(upstream)
        if "beta1" in group or "beta2" in group:
            if "betas" in group or not ("beta1" in group and "beta2" in group):
                raise ValueError("a Muon param group needs both 'beta1' and 'beta2' (or 'betas'), not a mix")
            group["betas"] = (group.pop("beta1"), group.pop("beta2"))
        super().add_param_group(group)

    def _validate(self, group: dict[str, Any]) -> None:
        algo = group["algorithm"]
        if algo not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {algo!r} in a Muon param group; valid: {', '.join(ALGORITHMS)}")
        if len(group["betas"]) != 2:
            raise ValueError(f"betas must have two values, got {group['betas']}")
        group["betas"] = tuple(group["betas"])
        if group["adjust_lr"] is None:
            group["adjust_lr"] = "none"
        if group["lr"] < 0 or group["weight_decay"] < 0 or not 0 <= group["momentum"] < 1:
            raise ValueError("Muon needs lr >= 0, weight_decay >= 0 and 0 <= momentum < 1")
        if algo != "muon":
            return
        if group["orthogonalization"] not in METHODS:
            raise ValueError(f"unknown orthogonalization {group['orthogonalization']!r}; valid: {', '.join(METHODS)}")
        adjusted_lr_factor(group["adjust_lr"], (1, 1))
        s = group["split_rows"]
        for p in group["params"]:
            if p.ndim < 2:
                raise ValueError(f"Muon groups take matrices (ndim >= 2), got shape {tuple(p.shape)}")
            if s != 1 and (p.ndim != 2 or group["flatten"]):
                raise ValueError(f"split_rows={s} needs a 2-D matrix without flatten, got shape {tuple(p.shape)}")
            if s < 1 or p.shape[-2] % s:
                raise ValueError(f"split_rows={s} must divide the row count of a {tuple(p.shape)} matrix")
            if self._mesh is None and hasattr(p, "placements"):
                raise ValueError("DTensor params need distributed_mesh=<1-D DeviceMesh>")
            if self._mesh is not None and hasattr(p, "placements"):
                if p.ndim != 2 or len(p.placements) != 1 or not p.placements[0].is_shard(0):
                    raise NotImplementedError(
                        f"Muon supports FSDP2 Shard(0) 2-D params only, got {p.placements} on {tuple(p.shape)}"
                    )

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> None:
        """State exists for every param from the start so every rank has the same keys (what DCP expects)."""
        state = self.state[p]
        if group["algorithm"] == "muon":
            state.setdefault("momentum", torch.zeros_like(p))
        else:
            state.setdefault("exp_avg", torch.zeros_like(p))
            state.setdefault("exp_avg_sq", torch.zeros_like(p))
            state.setdefault("step", torch.zeros((), dtype=torch.float32, device=local(p).device))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep each AdamW step counter an fp32 tensor on its param's device; a checkpoint from before
        per-parameter counters gets the group's step count (``scalar_opts.restore_step_counter``)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            if group["algorithm"] != "adamw":
                continue
            for p in group["params"]:
                restore_step_counter(self.state[p], "step", local(p).device, group["step"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        muon_groups = []
        for group in self.param_groups:
            group["step"] += 1
            if group["algorithm"] == "muon":
                muon_groups.append(group)
            else:
                self._adamw_step(group)
        if muon_groups:
            self._muon_step(muon_groups)
        return loss

    def _adamw_step(self, group: dict[str, Any]) -> None:
        """Decoupled AdamW (shared implementation, per-parameter step counts for the bias correction)."""
        params = [p for p in group["params"] if p.grad is not None]
        states = [self.state[p] for p in params]
        b1, b2 = group["betas"]
        adamw_step(
            [local(p) for p in params],
            [local(p.grad) for p in params],
            [local(s["exp_avg"]) for s in states],
            [local(s["exp_avg_sq"]) for s in states],
            [s["step"] for s in states],
            lr=group["lr"], beta1=b1, beta2=b2, weight_decay=group["weight_decay"], eps=group["eps"],
            cautious_wd=group["cautious_wd"],
        )

    def _matrix_view(self, p: Tensor, group: dict[str, Any]) -> tuple[int, ...]:
        """Shape under which ``p`` is orthogonalised: (blocks, rows, cols); blocks = split_rows or the batch dims."""
        if group["flatten"] and p.ndim > 2:
            return (1, p.shape[0], math.prod(p.shape[1:]))
        rows, cols = p.shape[-2] // group["split_rows"], p.shape[-1]
        return (math.prod(p.shape[:-2]) * group["split_rows"], rows, cols)

    def _muon_step(self, groups: list[dict[str, Any]]) -> None:
        # 1. momentum and the orthogonaliser input, per group (foreach over local shards). μ is an fp32 tensor, as
        #    upstream: a Python float in a _foreach op would be rounded to the momentum dtype (bf16: 0.9 → 0.8984).
        items = []  # (param, group, bf16 input as (blocks, rows, cols) of the FULL matrix)
        for group in groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            mu = f32(group["momentum"], local(params[0]).device)
            m = [local(self.state[p]["momentum"]) for p in params]
            g = [local(p.grad).to(mi.dtype) for p, mi in zip(params, m, strict=True)]
            torch._foreach_mul_(m, mu)
            torch._foreach_add_(m, g)
            if group["nesterov"]:
                u = torch._foreach_mul(m, mu)
                torch._foreach_add_(u, g)
            else:
                u = m
            for p, u_i in zip(params, u, strict=True):
                full = self._gather_full(p, u_i.bfloat16())
                items.append((p, group, full.reshape(self._matrix_view(p, group))))
        # 2. orthogonalise every same-shape block together (one batched call per bucket).
        buckets: dict[tuple, list[int]] = defaultdict(list)
        for i, (_, group, x) in enumerate(items):
            method = group["orthogonalization"]
            steps = group["ns_steps"] if method == "newton_schulz_kj" else 5
            buckets[(tuple(x.shape[1:]), method, steps, group["eps"], group["fast_cpu_orthogonalization"])].append(i)
        outputs: list[Tensor | None] = [None] * len(items)
        for (_, *how), idx in buckets.items():
            stacked = torch.cat([items[i][2] for i in idx]) if len(idx) > 1 else items[idx[0]][2]
            ortho = split_orthogonalize(stacked, functools.partial(self._orth, how=tuple(how)), self._group)
            for i, part in zip(idx, ortho.split([items[i][2].shape[0] for i in idx]), strict=True):
                outputs[i] = part
        # 3. decoupled weight decay then the scaled update, on this rank's rows. The scalars are fp32 tensors formed
        #    once per group/shape, as upstream (1 - lr·wd and lr·adjust in fp32; the update product in bf16).
        scalars: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}
        for (p, group, x), o in zip(items, outputs, strict=True):
            key = (id(group), tuple(x.shape[1:]))
            if key not in scalars:
                device = local(p).device
                lr32 = f32(group["lr"], device)
                wd = lr32 * f32(group["weight_decay"], device)
                scalars[key] = (wd, 1 - wd, lr32 * adjusted_lr_factor(group["adjust_lr"], key[1]))
            coeff, decay, scale = scalars[key]
            update = self._local_rows(p, o.reshape(p.shape)) * scale  # bf16 product, as upstream
            w = local(p)
            if group["cautious_wd"]:
                cautious_decay([w], [update], coeff)
            else:
                w.mul_(decay)
            w.sub_(update)

    def _orth(self, x: Tensor, how: tuple[str, int, float, bool]) -> Tensor:
        method, steps, eps, fast = how
        if self._orth_fn is not None:
            return self._orth_fn(x, epsilon=eps)
        return orthogonalize(x, method, steps, eps, fast_cpu=fast)

    def _gather_full(self, p: Tensor, local_u: Tensor) -> Tensor:
        """The full matrix on every rank: plain tensors already are; FSDP2 shards are all-gathered (bf16)."""
        if not hasattr(p, "placements"):
            return local_u
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(local_u, self._mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()

    def _local_rows(self, p: Tensor, full: Tensor) -> Tensor:
        """This rank's ``Shard(0)`` rows of a full matrix (``torch.chunk`` layout: ceil(R/W) rows per rank)."""
        if not hasattr(p, "placements"):
            return full
        return local_rows(full, dist.get_world_size(self._group), dist.get_rank(self._group))


def _muon_settings(ctx: OptimizerContext) -> dict[str, Any]:
    """Muon group settings from ``optimizer.muon_config`` (validated by ``MuonConfig.__post_init__``)."""
    mc = ctx.config.muon_config
    return dict(
        algorithm="muon",
        lr=mc.muon_lr if mc.muon_lr is not None else ctx.peak_lr,
        weight_decay=mc.weight_decay if mc.weight_decay is not None else ctx.config.weight_decay,
        momentum=mc.momentum,
        nesterov=mc.nesterov,
        adjust_lr=mc.adjust_lr,
        orthogonalization=mc.orthogonalization,
        ns_steps=mc.ns_steps,
        fast_cpu_orthogonalization=mc.fast_cpu_orthogonalization,
    )


def build_muonclip(ctx: OptimizerContext) -> BuiltOptimizer:
    """Muon on the block matrices (fused QKV split into Q, K, V), AdamW without decay on embeddings (= tied LM head),
    norms, biases and heads; QK-clip after each step when ``enable_clipping``."""
    cfg, mc = ctx.config, ctx.config.muon_config
    muon = _muon_settings(ctx)
    adam_lr = mc.adam_lr if mc.adam_lr is not None else ctx.peak_lr
    groups, log_lines = [], []
    for spec in ctx.param_groups:
        if spec.kind == "matrix":
            groups.append({"params": spec.params, "name": spec.name, **muon, "split_rows": spec.split_rows})
            log_lines.append(
                f"muonclip group {spec.name}: muon lr={muon['lr']:g} wd={muon['weight_decay']:g} "
                f"mu={muon['momentum']:g} nesterov={muon['nesterov']} {muon['orthogonalization']} "
                f"adjust_lr={muon['adjust_lr']} split_rows={spec.split_rows}"
                + (" fast_cpu_orthogonalization" if muon["fast_cpu_orthogonalization"] else "")
            )
        else:
            groups.append(
                {"params": spec.params, "name": spec.name, "algorithm": "adamw", "lr": adam_lr, "weight_decay": 0.0}
            )
            log_lines.append(f"muonclip group {spec.name}: adamw lr={adam_lr:g} wd=0 betas={tuple(cfg.betas)}")
    optimizer = Muon(groups, betas=tuple(cfg.betas), epsilon=cfg.eps, distributed_mesh=ctx.distributed_mesh)
    qk_clip = build_qk_clip(ctx.model, mc, ctx.distributed_mesh)
    if qk_clip is not None:
        log_lines.append(f"muonclip {qk_clip.description}")
    return BuiltOptimizer(optimizer=optimizer, qk_clip=qk_clip, log_lines=log_lines)
