"""Muon for hidden matrices plus AdamW for everything else, in one optimizer; and the ``muonclip`` builder.

Each param group has an ``algorithm`` key: ``"muon"`` or ``"adamw"``. A Muon step per matrix ``W`` (m×n) is

    M ← μ·M + G;  U = G + μ·M (Nesterov) or M;  O = orthogonalize(bf16(U));  W ← W·(1 − ηλ) − bf16(η̃·O)

where ``η̃`` rescales the LR from the *projection* shape (``adjust_lr``). A group with ``split_rows = s`` (fused QKV)
is treated as ``s`` independent ``(m/s)×n`` matrices: each block is orthogonalised and scaled on its own. With
``adjust_lr="spectral_norm"``, ``nesterov=False`` and the default orthogonaliser this is exactly upstream
``dion.Muon``'s eager step (spec ``dion2_muonclip.md`` §3.1), bit-for-bit on CPU. All per-step scalars are computed
in fp32 on the host from Python floats, so ``step()`` never waits for the device.

Distributed: with a ``ProcessGroup`` (DDP, replicated params, grads already averaged) every rank holds every matrix;
the orthogonalisation of each same-shape batch is split across ranks and all-gathered, so all ranks apply the same
bits. With a 1-D ``DeviceMesh`` (FSDP2, ``Shard(0)`` DTensor params) each rank all-gathers the bf16 update input,
the same split orthogonalisation runs, and every rank applies the rows of its own shard.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from neobert_pt.optim.orthogonalize import METHODS, orthogonalize
from neobert_pt.optim.qk_clip import build_qk_clip
from neobert_pt.optim.registry import BuiltOptimizer, OptimizerContext, register

logger = logging.getLogger(__name__)

ALGORITHMS = ("muon", "adamw")
ADJUST_LR = ("spectral_norm", "rms_norm", "none")


def adjusted_lr_factor(adjust_lr: str, shape: tuple[int, int]) -> float:
    """Multiplier of η for one projection of shape ``(fan_out, fan_in)``.

    ``rms_norm`` = 0.2·sqrt(max(m, n)) makes the update RMS ≈ 0.2 like AdamW (Moonlight), so AdamW LRs carry over;
    ``spectral_norm`` = sqrt(m/n) (µP / upstream default, no max(1,·) clamp); ``none`` = 1.
    """
    m, n = shape
    if adjust_lr == "rms_norm":
        return 0.2 * math.sqrt(max(m, n))
    if adjust_lr == "spectral_norm":
        return math.sqrt(m / n)
    if adjust_lr == "none":
        return 1.0
    raise ValueError(f"unknown adjust_lr {adjust_lr!r}; valid: {', '.join(ADJUST_LR)}")


def _f32(x: float) -> Tensor:
    return torch.tensor(x, dtype=torch.float32)


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view sharing its storage), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class Muon(torch.optim.Optimizer):
    """Muon (``algorithm="muon"`` groups, 2-D params) and AdamW (``algorithm="adamw"`` groups) in one instance.

    Group keys (all overridable per group): ``lr``, ``momentum`` (μ), ``nesterov``, ``weight_decay`` (decoupled,
    multiplied by the group LR), ``adjust_lr``, ``split_rows``, ``orthogonalization``, ``ns_steps`` (only for
    ``newton_schulz_kj``), ``betas`` and ``eps`` (AdamW; ``eps`` is also the orthogonaliser's normalisation epsilon,
    as upstream). Defaults are upstream ``dion.Muon``'s so the reference fixture reproduces with plain arguments.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.01,
        momentum: float = 0.95,
        nesterov: bool = False,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        adjust_lr: str = "spectral_norm",
        orthogonalization: str = "polar_express",
        ns_steps: int = 5,
        split_rows: int = 1,
        distributed_mesh: Any = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            betas=tuple(betas),
            eps=eps,
            adjust_lr=adjust_lr,
            orthogonalization=orthogonalization,
            ns_steps=ns_steps,
            split_rows=split_rows,
            algorithm="muon",
            step=0,
        )
        super().__init__(params, defaults)
        self._group, self._mesh = self._resolve_mesh(distributed_mesh)
        for group in self.param_groups:
            self._validate(group)
            for p in group["params"]:
                self._init_state(p, group)

    @staticmethod
    def _resolve_mesh(mesh: Any) -> tuple[Any, Any]:
        """(process group for splitting work, DeviceMesh or None)."""
        if mesh is None:
            return None, None
        from torch.distributed.device_mesh import DeviceMesh

        if isinstance(mesh, DeviceMesh):
            if mesh.ndim != 1:
                raise ValueError(
                    f"Muon needs a 1-D DeviceMesh (pass the shard sub-mesh for HSDP), got ndim={mesh.ndim}"
                )
            return mesh.get_group(), mesh
        if isinstance(mesh, dist.ProcessGroup):
            return mesh, None
        raise TypeError(f"distributed_mesh must be None, a ProcessGroup or a 1-D DeviceMesh, got {type(mesh).__name__}")

    def _validate(self, group: dict[str, Any]) -> None:
        algo = group["algorithm"]
        if algo not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {algo!r} in a Muon param group; valid: {', '.join(ALGORITHMS)}")
        if "beta1" in group or "beta2" in group:
            raise ValueError("use the group key 'betas=(beta1, beta2)', not 'beta1'/'beta2'")
        if len(group["betas"]) != 2:
            raise ValueError(f"betas must have two values, got {group['betas']}")
        group["betas"] = tuple(group["betas"])
        if group["lr"] < 0 or group["weight_decay"] < 0 or not 0 <= group["momentum"] < 1:
            raise ValueError("Muon needs lr >= 0, weight_decay >= 0 and 0 <= momentum < 1")
        if algo != "muon":
            return
        if group["orthogonalization"] not in METHODS:
            raise ValueError(f"unknown orthogonalization {group['orthogonalization']!r}; valid: {', '.join(METHODS)}")
        adjusted_lr_factor(group["adjust_lr"], (1, 1))
        s = group["split_rows"]
        for p in group["params"]:
            if p.ndim != 2:
                raise ValueError(f"Muon groups take 2-D matrices only, got shape {tuple(p.shape)}")
            if s < 1 or p.shape[0] % s:
                raise ValueError(f"split_rows={s} must divide the row count of a {tuple(p.shape)} matrix")
            if self._mesh is None and hasattr(p, "placements"):
                raise ValueError("DTensor params need distributed_mesh=<1-D DeviceMesh>")
            if self._mesh is not None and hasattr(p, "placements"):
                if len(p.placements) != 1 or not p.placements[0].is_shard(0):
                    raise NotImplementedError(f"Muon supports FSDP2 Shard(0) params only, got {p.placements}")

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> None:
        """State exists for every param from the start so every rank has the same keys (what DCP expects)."""
        state = self.state[p]
        if group["algorithm"] == "muon":
            state.setdefault("momentum", torch.zeros_like(p))
        else:
            state.setdefault("exp_avg", torch.zeros_like(p))
            state.setdefault("exp_avg_sq", torch.zeros_like(p))

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
        """Decoupled AdamW through torch's fused kernel (one pass per tensor instead of eight foreach passes).

        The kernel reads the step count from a tensor; it is made on the params' device with a fill (no host sync).
        """
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        b1, b2 = group["betas"]
        lists = [
            [_local(p) for p in params],
            [_local(p.grad) for p in params],
            [_local(self.state[p]["exp_avg"]) for p in params],
            [_local(self.state[p]["exp_avg_sq"]) for p in params],
        ]
        for (device, _), ((w, g, m, v), _) in torch.optim.Optimizer._group_tensors_by_device_and_dtype(lists).items():
            step = torch.full((), float(group["step"]), dtype=torch.float32, device=device)
            torch._fused_adamw_(
                w, g, m, v, [], [step] * len(w), lr=group["lr"], beta1=b1, beta2=b2,
                weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False, maximize=False,
            )

    def _muon_step(self, groups: list[dict[str, Any]]) -> None:
        # 1. momentum and the orthogonaliser input, per group (foreach over local shards).
        items = []  # (param, group, bf16 input as (split, rows/split, cols) of the FULL matrix)
        for group in groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            mu = group["momentum"]
            g = [_local(p.grad) for p in params]
            m = [_local(self.state[p]["momentum"]) for p in params]
            torch._foreach_mul_(m, mu)
            torch._foreach_add_(m, g)
            if group["nesterov"]:
                u = torch._foreach_mul(m, mu)
                torch._foreach_add_(u, g)
            else:
                u = m
            s = group["split_rows"]
            for p, u_i in zip(params, u, strict=True):
                full = self._gather_full(p, u_i.bfloat16())
                items.append((p, group, full.view(s, p.shape[0] // s, p.shape[1])))
        # 2. orthogonalise every same-shape block together (one batched call per bucket).
        buckets: dict[tuple, list[int]] = defaultdict(list)
        for i, (_, group, x) in enumerate(items):
            method = group["orthogonalization"]
            steps = group["ns_steps"] if method == "newton_schulz_kj" else 5
            buckets[(tuple(x.shape[1:]), method, steps, group["eps"])].append(i)
        outputs: list[Tensor | None] = [None] * len(items)
        for (_, method, steps, eps), idx in buckets.items():
            stacked = torch.cat([items[i][2] for i in idx]) if len(idx) > 1 else items[idx[0]][2]
            ortho = self._orthogonalize_split(stacked, method, steps, eps)
            for i, part in zip(idx, ortho.split([items[i][2].shape[0] for i in idx]), strict=True):
                outputs[i] = part
        # 3. decoupled weight decay then the scaled update, on this rank's rows (scalars formed once per group/shape).
        scalars: dict[tuple, tuple[float, float]] = {}
        for (p, group, x), o in zip(items, outputs, strict=True):
            key = (id(group), tuple(x.shape[1:]))
            if key not in scalars:
                lr32 = _f32(group["lr"])
                scalars[key] = (
                    float(1 - lr32 * group["weight_decay"]),
                    float(lr32 * adjusted_lr_factor(group["adjust_lr"], key[1])),
                )
            decay, scale = scalars[key]
            update = self._local_rows(p, o.reshape(p.shape)) * scale  # bf16 product, as upstream
            w = _local(p)
            w.mul_(decay)
            w.sub_(update)

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
        world, rank = dist.get_world_size(self._group), dist.get_rank(self._group)
        per_rank = -(-p.shape[0] // world)
        return full[rank * per_rank : (rank + 1) * per_rank]

    def _orthogonalize_split(self, x: Tensor, method: str, steps: int, eps: float) -> Tensor:
        """Orthogonalise a (N, r, c) batch; with a process group, each rank does N/W matrices and all-gathers.

        A single matrix is done redundantly (nothing to split). Zero padding matrices stay zero and are dropped.
        """
        world = dist.get_world_size(self._group) if self._group is not None else 1
        n = x.shape[0]
        if world == 1 or n == 1:
            return orthogonalize(x, method, steps, eps)
        per_rank = -(-n // world)
        pad = per_rank * world - n
        if pad:
            x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
        rank = dist.get_rank(self._group)
        mine = orthogonalize(x[rank * per_rank : (rank + 1) * per_rank], method, steps, eps).contiguous()
        out = torch.empty_like(x)
        dist.all_gather_into_tensor(out, mine, group=self._group)
        return out[:n]


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
    )


@register("muonclip")
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
            )
        else:
            groups.append(
                {"params": spec.params, "name": spec.name, "algorithm": "adamw", "lr": adam_lr, "weight_decay": 0.0}
            )
            log_lines.append(f"muonclip group {spec.name}: adamw lr={adam_lr:g} wd=0 betas={tuple(cfg.betas)}")
    optimizer = Muon(groups, betas=tuple(cfg.betas), eps=cfg.eps, distributed_mesh=ctx.distributed_mesh)
    qk_clip = build_qk_clip(ctx.model, mc, ctx.distributed_mesh)
    if qk_clip is not None:
        log_lines.append(f"muonclip {qk_clip.description}")
    return BuiltOptimizer(optimizer=optimizer, qk_clip=qk_clip, log_lines=log_lines)
