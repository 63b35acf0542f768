"""Dion2: Muon with a shrunk orthonormalisation, implemented natively (``docs/specs/dion2_muonclip.md`` §1).

Per matrix and step: an error-feedback buffer ``M`` accumulates raw gradients; the ``fraction`` of rows (wide or
square matrices) or columns (tall ones) with the largest L1 norm is orthogonalised in bf16 and applied to the same
slices of ``W``; only those slices of ``M`` are multiplied by ``ef_decay``. Weight decay touches every entry. Scalar
parameters (embeddings, norms, biases) are stepped by AdamW or Lion inside the same optimizer (``algorithm`` key).

Op order and dtypes follow upstream ``microsoft/dion`` eager code, so single-process results reproduce its CPU
fixture bit-for-bit. The pieces shared with Muon and Dion (mesh resolution, local shards, the DDP work split, the LR
adjustment) are in :mod:`neobert_pt.optim.orthonormal`, the AdamW/Lion steps in :mod:`neobert_pt.optim.scalar_opts`;
the FSDP2 all-to-all of row-sharded matrices is in :mod:`neobert_pt.optim.dion2_distributed`.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from neobert_pt.config.errors import ConfigError
from neobert_pt.optim import dion2_distributed as _dist
from neobert_pt.optim.orthogonalize import note_eager_fallback, orthogonalize
from neobert_pt.optim.orthonormal import adjusted_lr_factor, local, resolve_mesh, split_orthogonalize
from neobert_pt.optim.qk_clip import build_qk_clip
from neobert_pt.optim.registry import BuiltOptimizer, OptimizerContext
from neobert_pt.optim.scalar_opts import adamw_step, lion_step, restore_step_counter

logger = logging.getLogger(__name__)

ALGORITHMS = ("dion2", "adamw", "lion")
ADJUST_LR_MODES = ("spectral_norm", "rms_norm", None)
SELECTION_SCOPES = ("local", "global")

OrthFn = Callable[[Tensor], Tensor]


def num_selected(fraction: float, n: int) -> int:
    """``k = max(1, ceil(fraction · n))``."""
    return max(1, math.ceil(fraction * n))


class Dion2(torch.optim.Optimizer):
    """Dion2 + AdamW/Lion scalar groups; constructor-compatible with upstream ``dion.Dion2``.

    ``distributed_mesh``: ``None`` (one process), a ``ProcessGroup`` (DDP: orthogonalisation of each same-shape
    bucket is split across ranks and all-gathered; bit-identical to one process) or a 1-D ``DeviceMesh`` (FSDP2
    ``Shard(0)`` DTensor params: selected rows travel by all-to-all to an owner rank). Gradients must already be
    synchronised (DDP/FSDP2 do that); this optimizer never reduces gradients.

    Group keys beyond upstream: ``betas`` (mapped to ``beta1``/``beta2``, never silently ignored) and
    ``split_rows`` (> 1: the matrix stacks that many independent row blocks, e.g. fused QKV = 3; each block is
    selected, orthogonalised and LR-scaled as its own matrix. Not applied to FSDP2 row-sharded params, whose row
    shards cut across blocks: there the matrix is treated whole).

    Arithmetic is upstream's eager arithmetic, rounding points included. One of them is worth knowing: the update is
    formed as ``(−η̃) * O`` with ``η̃`` an fp32 0-d tensor as the *first* operand, and torch then rounds that scalar to
    the param dtype, so for bf16 params the step size is ``bf16(η̃)`` (for fp32 params nothing changes). This is kept
    for bit-parity with upstream (issue 14); Muon's ``O * η̃`` keeps η̃ in fp32, as upstream's Muon does.
    """

    def __init__(
        self,
        params: Iterable[Any],
        distributed_mesh: Any = None,
        lr: float = 0.01,
        fraction: float = 0.25,
        ef_decay: float = 0.95,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.01,
        epsilon: float = 1e-8,
        adjust_lr: str | None = "spectral_norm",
        flatten: bool = False,
        use_triton: bool = False,
        use_polar_express: bool = True,
        use_gram_newton_schulz: bool = False,
        newton_schulz_func: OrthFn | None = None,
        verbose: bool = False,
        triton_post_ortho: bool = False,
        selection_scope: str = "local",
        *,
        fast_cpu_orthogonalization: bool = False,
    ) -> None:
        if lr < 0:
            raise ValueError(f"invalid lr {lr}")
        note_eager_fallback(
            "Dion2", use_triton=use_triton, use_gram_newton_schulz=use_gram_newton_schulz,
            triton_post_ortho=triton_post_ortho,
        )
        defaults = dict(
            lr=lr, ef_decay=ef_decay, fraction=float(fraction), beta1=betas[0], beta2=betas[1],
            weight_decay=weight_decay, epsilon=epsilon, flatten=flatten, adjust_lr=adjust_lr,
            algorithm="dion2", step=0, selection_scope=selection_scope, split_rows=1,
            fast_cpu_orthogonalization=fast_cpu_orthogonalization,
        )
        distribution = resolve_mesh(distributed_mesh, "Dion2")
        self._mesh_kind, self._group, self._mesh = distribution.kind, distribution.group, distribution.mesh
        self._orth: OrthFn | None = newton_schulz_func
        self._orth_method = "polar_express" if use_polar_express else "newton_schulz"
        self._verbose = verbose
        self._reported_shapes: set[tuple] = set()
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if isinstance(p, DTensor) and self._mesh_kind != "fsdp":
                    raise RuntimeError("DTensor parameters need distributed_mesh to be their 1-D DeviceMesh")
                self._init_state(p, group["algorithm"])

    # ----------------------------------------------------------------------------------------- groups and state
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Map ``betas`` to ``beta1``/``beta2`` and validate hyperparameters before torch fills the defaults."""
        group = dict(param_group)
        if "betas" in group:
            betas = tuple(group.pop("betas"))
            if len(betas) != 2:
                raise ValueError(f"betas must have two values, got {betas}")
            group["beta1"], group["beta2"] = betas
        super().add_param_group(group)
        group = self.param_groups[-1]
        if group["algorithm"] not in ALGORITHMS:
            raise ValueError(f"Unknown algorithm {group['algorithm']!r}; valid: {', '.join(ALGORITHMS)}")
        if isinstance(group["fraction"], int):
            group["fraction"] = float(group["fraction"])
        if not 0.0 < group["fraction"] <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {group['fraction']}")
        if group["ef_decay"] < 0:
            raise ValueError(f"ef_decay must be >= 0, got {group['ef_decay']}")
        if group["beta1"] < 0 or group["beta2"] < 0:
            raise ValueError(f"betas must be >= 0, got ({group['beta1']}, {group['beta2']})")
        if group["adjust_lr"] not in ADJUST_LR_MODES:
            raise ValueError(f"unknown adjust_lr {group['adjust_lr']!r}; valid: spectral_norm, rms_norm, None")
        if group["selection_scope"] not in SELECTION_SCOPES:
            raise ValueError(f"unknown selection_scope {group['selection_scope']!r}; valid: local, global")
        if group["algorithm"] == "dion2":
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(f"dion2 groups take matrices (ndim >= 2); got a tensor of shape {tuple(p.shape)}")
                if p.shape[-2] % group["split_rows"]:
                    raise ValueError(f"split_rows={group['split_rows']} does not divide {p.shape[-2]} rows")
                if group["flatten"] and p.ndim > 2 and (group["split_rows"] != 1 or isinstance(p, DTensor)):
                    raise ValueError("flatten=True applies to unsharded params without split_rows")

    def _init_state(self, p: Tensor, algorithm: str) -> None:
        """Pre-populate state for every param so the key set is identical on every rank (DCP needs that)."""
        state = self.state[p]
        if state:
            return
        state["momentum"] = torch.zeros_like(p)
        if algorithm == "adamw":
            state["variance"] = torch.zeros_like(p)
            state["step_dev"] = torch.zeros((), dtype=torch.float32, device=local(p).device)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Torch casts floating state to the param dtype; keep AdamW's step counter fp32 and recreate it if missing."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            if group["algorithm"] != "adamw":
                continue
            for p in group["params"]:
                restore_step_counter(self.state[p], "step_dev", local(p).device, group["step"])

    # ------------------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every group. No host synchronisation: selection sizes are Python ints."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            group["step"] += 1
        for algorithm, fn in (("dion2", self._step_dion2), ("lion", self._step_lion), ("adamw", self._step_adamw)):
            for group in self.param_groups:
                if group["algorithm"] == algorithm:
                    fn(group)
        return loss

    def _orthogonalize(self, x: Tensor, eps: float, fast_cpu: bool) -> Tensor:
        if self._orth is not None:
            return self._orth(x, epsilon=eps)
        return orthogonalize(x, method=self._orth_method, eps=eps, fast_cpu=fast_cpu)

    def _step_dion2(self, group: dict[str, Any]) -> None:
        lr = torch.tensor(group["lr"], dtype=torch.float32)
        decay = 1 - lr * group["weight_decay"]
        buckets: dict[tuple, list[Tensor]] = defaultdict(list)
        for p in group["params"]:
            if p.grad is None:
                continue
            layout = _dist.classify(p, self._mesh_kind, self._mesh)
            buckets[(tuple(p.shape), p.dtype, layout)].append(p)
        orth = lambda x: self._orthogonalize(x, group["epsilon"], group["fast_cpu_orthogonalization"])  # noqa: E731
        for (shape, _, layout), params in buckets.items():
            if layout == "row_sharded":
                rows, cols = shape[-2], shape[-1]
                neg_lr = -(lr * adjusted_lr_factor(group["adjust_lr"], (rows, cols)))
                args = (params, self.state, group, decay, neg_lr, orth, self._group)
                if group["selection_scope"] == "global":
                    _dist.fsdp_step_global(*args)
                else:
                    _dist.fsdp_step_local(*args)
            else:
                self._dense_bucket(params, group, lr, decay, orth)

    def _dense_bucket(self, params: list[Tensor], group: dict[str, Any], lr: Tensor, decay: Tensor, orth: OrthFn) -> None:
        """Same-shape unsharded matrices (or batch-sharded stacks): select locally, orthogonalise as one batch."""
        shape = params[0].shape
        if group["flatten"] and len(shape) > 2:  # each param is one (shape[0], prod(rest)) matrix
            rows, cols = shape[0], math.prod(shape[1:])
        else:
            rows, cols = shape[-2] // group["split_rows"], shape[-1]
        select_rows = rows <= cols
        dim = 1 if select_rows else 2
        k = num_selected(group["fraction"], rows if select_rows else cols)
        neg_lr = -(lr * adjusted_lr_factor(group["adjust_lr"], (rows, cols)))
        if self._verbose and (tuple(shape), rows, cols) not in self._reported_shapes:
            self._reported_shapes.add((tuple(shape), rows, cols))
            logger.info("Dion2: param %s -> %dx%d matrices, selecting %d %s", tuple(shape), rows, cols, k,
                        "rows" if select_rows else "columns")
        ms = [local(self.state[p]["momentum"]) for p in params]
        torch._foreach_add_(ms, [local(p.grad).to(m.dtype) for p, m in zip(params, ms, strict=True)])
        # One stacked copy of the bucket's momenta: norms, top-k and gather run once for the whole bucket.
        m3s = [m.view(-1, rows, cols) for m in ms]
        stack = torch.cat(m3s) if len(m3s) > 1 else m3s[0]
        idx = stack.norm(p=1, dim=3 - dim).topk(k, dim=-1, sorted=False).indices
        idx = idx.unsqueeze(2).expand(-1, -1, cols) if select_rows else idx.unsqueeze(1).expand(-1, rows, -1)
        selected = stack.gather(dim, idx)
        decayed = selected * group["ef_decay"]
        stacked = selected.bfloat16()
        counts = [m.shape[0] for m in m3s]
        picks = idx.split(counts)
        for m3, i, d in zip(m3s, picks, decayed.split(counts), strict=True):
            m3.scatter_(dim, i, d)
        if stacked.shape[0] == 1:  # a lone matrix takes the 2-D path, as upstream
            ortho = orth(stacked[0]).unsqueeze(0)
        else:  # DDP: the work split over ranks; FSDP2 (whole local matrices) and one process: locally
            ortho = split_orthogonalize(stacked, orth, self._group if self._mesh_kind == "ddp" else None)
        ws = [local(p) for p in params]
        torch._foreach_mul_(ws, decay)
        update = neg_lr * ortho.to(ws[0].dtype)  # this operand order, as upstream (see the class docstring)
        for w, i, u in zip(ws, picks, update.split(counts), strict=True):
            w.view(-1, rows, cols).scatter_add_(dim, i, u)

    def _step_lion(self, group: dict[str, Any]) -> None:
        """Lion (shared implementation: scalars in fp32, upstream's op order)."""
        params = [p for p in group["params"] if p.grad is not None]
        lion_step(
            [local(p) for p in params],
            [local(p.grad) for p in params],
            [local(self.state[p]["momentum"]) for p in params],
            lr=group["lr"], beta1=group["beta1"], beta2=group["beta2"], weight_decay=group["weight_decay"],
            cautious_wd=group.get("cautious_wd", False),
        )

    def _step_adamw(self, group: dict[str, Any]) -> None:
        """Decoupled AdamW (shared implementation; per-parameter fp32 step counters, so bias correction never
        syncs and a parameter that skipped steps is corrected for its own count)."""
        params = [p for p in group["params"] if p.grad is not None]
        states = [self.state[p] for p in params]
        adamw_step(
            [local(p) for p in params],
            [local(p.grad) for p in params],
            [local(s["momentum"]) for s in states],
            [local(s["variance"]) for s in states],
            [s["step_dev"] for s in states],
            lr=group["lr"], beta1=group["beta1"], beta2=group["beta2"], weight_decay=group["weight_decay"],
            eps=group["epsilon"], cautious_wd=group.get("cautious_wd", False),
        )

UPSTREAM_INSTALL = "pip install 'git+https://github.com/microsoft/dion.git'"


def _dion2_class(implementation: str) -> type[torch.optim.Optimizer]:
    """The native class, or upstream ``dion.Dion2`` (optional; installs from GitHub only)."""
    if implementation == "native":
        return Dion2
    try:
        from dion import Dion2 as UpstreamDion2
    except ImportError as err:
        raise ImportError(
            f"optimizer.dion2_config.implementation=upstream needs Microsoft's dion package: {UPSTREAM_INSTALL} "
            "(or use implementation: native, which reproduces it)"
        ) from err
    return UpstreamDion2


def _check_config(ctx: OptimizerContext) -> None:
    dc = ctx.config.dion2_config
    if not 0 < dc.fraction <= 1:
        raise ConfigError(f"optimizer.dion2_config.fraction={dc.fraction} must be in (0, 1]")
    if dc.ef_decay < 0:
        raise ConfigError(f"optimizer.dion2_config.ef_decay={dc.ef_decay} must be >= 0")


def build_dion2(ctx: OptimizerContext) -> BuiltOptimizer:
    """Dion2 on the block matrices (fused QKV as 3 row blocks), AdamW/Lion without decay on embeddings (= tied LM
    head), norms, biases and heads; QK-clip after each step when ``enable_clipping``."""
    _check_config(ctx)
    cfg, dc = ctx.config, ctx.config.dion2_config
    matrix_lr = dc.matrix_lr if dc.matrix_lr is not None else ctx.peak_lr / math.sqrt(dc.fraction)
    adjust_lr = None if dc.adjust_lr == "none" else dc.adjust_lr
    native = dc.implementation == "native"
    groups, log_lines = [], []
    for spec in ctx.param_groups:
        if spec.kind == "matrix":
            group = {"params": spec.params, "algorithm": "dion2", "lr": matrix_lr, "weight_decay": cfg.weight_decay}
            if native:
                group.update(
                    name=spec.name, split_rows=spec.split_rows,
                    fast_cpu_orthogonalization=dc.fast_cpu_orthogonalization,
                )
            groups.append(group)
            log_lines.append(
                f"dion2 group {spec.name}: dion2 lr={matrix_lr:g} wd={cfg.weight_decay:g} fraction={dc.fraction:g} "
                f"ef_decay={dc.ef_decay:g} adjust_lr={dc.adjust_lr} {dc.orthogonalization} "
                f"split_rows={spec.split_rows if native else 1}"
                + (" fast_cpu_orthogonalization" if native and dc.fast_cpu_orthogonalization else "")
            )
        else:
            group = {"params": spec.params, "algorithm": dc.scalar_algorithm, "lr": ctx.peak_lr, "weight_decay": 0.0}
            if native:
                group["name"] = spec.name
            groups.append(group)
            log_lines.append(f"dion2 group {spec.name}: {dc.scalar_algorithm} lr={ctx.peak_lr:g} wd=0")
    optimizer = _dion2_class(dc.implementation)(
        groups,
        distributed_mesh=ctx.distributed_mesh,
        lr=matrix_lr,
        fraction=dc.fraction,
        ef_decay=dc.ef_decay,
        betas=tuple(cfg.betas),
        weight_decay=cfg.weight_decay,
        epsilon=cfg.eps,
        adjust_lr=adjust_lr,
        use_polar_express=dc.orthogonalization == "polar_express",
        selection_scope=dc.selection_scope,
    )
    qk_clip = build_qk_clip(ctx.model, dc, ctx.distributed_mesh)
    if qk_clip is not None:
        log_lines.append(f"dion2 {qk_clip.description}")
    return BuiltOptimizer(optimizer=optimizer, qk_clip=qk_clip, log_lines=log_lines)


__all__ = ["Dion2", "build_dion2", "num_selected"]
