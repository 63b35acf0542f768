"""Optimizer registry: ``optimizer.name`` → the builder its catalog entry names (``neobert_pt/optim/catalog.py``).

Every builder has the same signature: it receives an :class:`OptimizerContext` (built by the trainer *after* the
model is wrapped, so DDP process groups and FSDP2 meshes are known) and returns a :class:`BuiltOptimizer`. A builder
named ``"module:function"`` in the catalog is imported here, when its optimizer is built; the config side never
imports an optimizer module. Adding an optimizer: docs/optimizers.md.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from neobert_pt.errors import ConfigError
from neobert_pt.optim.catalog import OptimizerEntry, optimizer_entry
from neobert_pt.optim.param_groups import ParamGroupSpec, describe_groups, group_parameters

if TYPE_CHECKING:  # the config section is built once every optimizer is registered: a builder module imports this
    # module, and may register itself afterwards (docs/optimizers.md), so importing it must not build the section.
    from neobert_pt.optim.config import OptimizerConfig
    from neobert_pt.optim.qk_clip import QKClip


@dataclass
class OptimizerContext:
    """Everything a builder may use. Builders must not reach for anything else."""

    model: nn.Module  # unwrapped model; under FSDP2 its parameters are DTensors
    config: OptimizerConfig
    max_steps: int
    # None: one process. ProcessGroup: DDP (replicated params). 1-D DeviceMesh: FSDP2 (Shard(0) DTensor params).
    distributed_mesh: Any = None
    # HSDP only (2-D replicate x shard mesh): the two 1-D sub-meshes; distributed_mesh is then the shard sub-mesh.
    replicate_mesh: Any = None
    shard_mesh: Any = None
    param_groups: list[ParamGroupSpec] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.param_groups:
            self.param_groups = group_parameters(self.model)

    @property
    def peak_lr(self) -> float:
        """optimizer.lr after resolving 'auto' (the trainer resolves it before building)."""
        if not isinstance(self.config.lr, (int, float)):
            raise ConfigError("optimizer.lr must be resolved to a number before the optimizer is built")
        return float(self.config.lr)


@dataclass
class BuiltOptimizer:
    """What the trainer steps: the optimizer, plus the QK-clip component when clipping is on."""

    optimizer: torch.optim.Optimizer
    qk_clip: QKClip | None = None
    log_lines: list[str] = field(default_factory=list)


def build_optimizer(ctx: OptimizerContext) -> BuiltOptimizer:
    """Build the optimizer named by ``ctx.config.name``; unknown names list the valid ones."""
    name = ctx.config.name
    built = load_builder(optimizer_entry(name))(ctx)
    built.log_lines = [f"optimizer {name}: peak lr {ctx.peak_lr:g}", *describe_groups(ctx.param_groups)] + built.log_lines
    return built


def load_builder(entry: OptimizerEntry) -> Any:
    """The builder function of a catalog entry, importing its module when the entry names it as a string."""
    if callable(entry.builder):
        return entry.builder
    module, _, attr = entry.builder.partition(":")
    return getattr(importlib.import_module(module), attr)


def torch_param_groups(ctx: OptimizerContext, weight_decay: float, **extra: Any) -> list[dict[str, Any]]:
    """Plain torch param groups: decay on matrix groups only; ``extra`` is copied into every group."""
    return [
        {
            "params": g.params,
            "name": g.name,
            "weight_decay": weight_decay if g.weight_decay else 0.0,
            **extra,
        }
        for g in ctx.param_groups
    ]


def build_adamw(ctx: OptimizerContext) -> BuiltOptimizer:
    """torch AdamW; decoupled weight decay on 2-D block weights only."""
    cfg = ctx.config
    groups = torch_param_groups(ctx, cfg.weight_decay)
    # The fused kernel (one pass, CPU and CUDA) is the fastest baseline; FSDP2's DTensor params take foreach.
    sharded = isinstance(ctx.distributed_mesh, DeviceMesh)
    opt = torch.optim.AdamW(groups, lr=ctx.peak_lr, betas=tuple(cfg.betas), eps=cfg.eps,
                            foreach=True if sharded else None, fused=None if sharded else True)
    return BuiltOptimizer(optimizer=opt)
