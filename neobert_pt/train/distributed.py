"""The one place that knows how the model is distributed: Accelerator creation, wrapping, mesh lookup, reductions.

Single process, DDP, FSDP2 (1-D mesh) and HSDP (2-D replicate x shard mesh, accelerate's ``parallelism_config``)
are all selected by the accelerate config file given to ``accelerate launch``; the trainer calls the same functions
in every case. ``modeling/`` has no distributed code.

HSDP: accelerate builds the 2-D ``(dp_replicate, dp_shard)`` DeviceMesh from the config; :func:`wrap_model` calls
``fully_shard`` itself over the ``dp_shard`` sub-mesh (each replica is one FSDP2 group, parameters are 1-D ``Shard(0)``
DTensors, so every optimizer that supports FSDP2 runs unchanged with the shard sub-mesh) and installs a
:class:`ReplicaGradSync` hook on every FSDP unit. The hook sees each reduce-scatter output: it averages it over the
replicate axis (FSDP's usual HSDP all-reduce), or, when the optimizer syncs replicas itself (Dion's compressed sync),
only counts bytes. accelerate's ``prepare`` then accepts the already-sharded model as it is.

Wrapping happens BEFORE the optimizer is built (the optimizer registry needs the FSDP2 mesh or the DDP process
group). accelerate insists on preparing a model together with an optimizer under FSDP2, so :func:`wrap_model`
prepares the model with a throw-away, stateless placeholder optimizer and forgets it again.
"""

from __future__ import annotations

import logging
import math
import os
import weakref
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, InitProcessGroupKwargs
from torch import nn

from neobert_pt.config.errors import ConfigError
from neobert_pt.optim.comm import CommCounter

logger = logging.getLogger(__name__)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def bf16_supported() -> bool:
    """bf16 autocast works on CPU (torch ≥ 2.x) and on CUDA devices that report bf16 support (Ampere+)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return True


def _enable_fsdp2_on_cpu(timeout_s: float | None = None) -> None:
    """Make accelerate honour an FSDP config on a CPU-only multi-process launch.

    accelerate enables FSDP only for GPU-like distributed types, so with ``use_cpu: true`` an FSDP config silently
    becomes DDP (platform.md). Initialising the shared ``PartialState`` on CPU (gloo) and then marking it
    ``MULTI_GPU`` lets ``Accelerator`` switch it to FSDP as on GPUs; ``fully_shard`` then runs on CPU with gloo.
    This touches accelerate's private shared state: accelerate is pinned (<1.16) and a test asserts that the
    parameters really are DTensors.
    """
    state = PartialState(cpu=True, **({"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}))
    state.distributed_type = DistributedType.MULTI_GPU


def hsdp_shape(world_size: int | None = None) -> tuple[int, int] | None:
    """``(replicate, shard)`` of an HSDP launch (accelerate's ``parallelism_config``), else None.

    Validated against the launched world size: a shape that does not multiply to it, or a pure replicate shape,
    is a :class:`ConfigError` naming the keys.
    """
    if not _env_flag("ACCELERATE_USE_PARALLELISM_CONFIG"):
        return None
    world = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    try:
        replicate = int(os.environ.get("PARALLELISM_CONFIG_DP_REPLICATE_SIZE", "1"))
        shard = int(os.environ.get("PARALLELISM_CONFIG_DP_SHARD_SIZE", "1"))
    except ValueError as err:
        raise ConfigError(
            f"accelerate parallelism_config: dp_replicate_size/dp_shard_size must be integers ({err})") from None
    others = {k: os.environ.get(f"PARALLELISM_CONFIG_{k.upper()}_SIZE", "1") for k in ("tp", "cp", "sp")}
    if any(v not in ("1", "") for v in others.values()):
        raise ConfigError(f"accelerate parallelism_config: only dp_replicate_size and dp_shard_size are supported "
                          f"by neobert_pt, got {others}; set tp/cp/sp sizes to 1")
    if replicate < 1 or shard < 1 or replicate * shard != world:
        raise ConfigError(
            f"accelerate parallelism_config: dp_replicate_size={replicate} x dp_shard_size={shard} = "
            f"{replicate * shard} does not equal the {world} launched processes; choose sizes whose product is "
            "num_processes (e.g. configs/accelerate/hsdp_cpu_2x2.yaml: 2 x 2 on 4 processes)"
        )
    if replicate == 1:
        return None  # a 1-D FSDP2 mesh: nothing to replicate
    if shard == 1:
        raise ConfigError(f"accelerate parallelism_config: dp_shard_size=1 with dp_replicate_size={replicate} is "
                          "plain data parallelism; use a DDP config (configs/accelerate/ddp_2gpu.yaml) instead")
    return replicate, shard


def make_accelerator(mixed_precision: str = "no", timeout_s: float | None = None) -> Accelerator:
    """The Accelerator for this process, from the environment ``accelerate launch`` set up.

    ``timeout_s`` (``trainer.distributed_timeout_s``) bounds every collective: a rank that stalls makes the others
    raise within that time instead of waiting for gloo's 30 minutes.
    """
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        raise ConfigError(
            "DeepSpeed is not supported by neobert_pt (also not for optimizer.name dion, whose compressed sync needs "
            "FSDP2 meshes); use an FSDP2 or HSDP accelerate config instead (configs/accelerate/fsdp2_1d_2gpu.yaml, "
            "configs/accelerate/hsdp_2x4_8gpu.yaml)"
        )
    hsdp_shape()  # validate the mesh shape before accelerate does (its error is a traceback)
    if mixed_precision == "bf16" and not bf16_supported():
        logger.warning("trainer.mixed_precision=bf16 is not supported on this device; training in fp32")
        mixed_precision = "no"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if _env_flag("ACCELERATE_USE_FSDP") and world_size > 1 and not torch.cuda.is_available():
        _enable_fsdp2_on_cpu(timeout_s)
    elif _env_flag("ACCELERATE_USE_FSDP") and world_size == 1:
        logger.warning("an FSDP accelerate config with one process shards nothing; running without FSDP")
        os.environ["ACCELERATE_USE_FSDP"] = "false"
    # The scheduler is stepped by the trainer once per optimizer step; accelerate's scheduler wrapper would step it
    # num_processes times, so the scheduler is never prepared (resume.py restores its position).
    # A multi-process launch without GPUs must use gloo on CPU; without cpu=True accelerate may start each rank as
    # an independent world-size-1 run (all of them racing on the same checkpoints).
    cpu_ranks = world_size > 1 and not torch.cuda.is_available()
    handlers = [InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))] if timeout_s else []
    acc = Accelerator(cpu=cpu_ranks, mixed_precision=mixed_precision, step_scheduler_with_optimizer=False,
                      kwargs_handlers=handlers)
    if world_size > 1 and acc.num_processes != world_size:
        raise RuntimeError(f"launched {world_size} processes but accelerate formed a group of {acc.num_processes}")
    if acc.distributed_type == DistributedType.FSDP and not acc.is_fsdp2:
        raise ConfigError("FSDP v1 is not supported; set fsdp_config.fsdp_version: 2 in the accelerate config")
    return acc


def is_hsdp(accelerator: Accelerator) -> bool:
    """A 2-D (replicate x shard) FSDP2 launch."""
    pc = accelerator.parallelism_config
    return bool(accelerator.is_fsdp2 and pc is not None and pc.dp_replicate_enabled and pc.dp_shard_enabled)


def mode(accelerator: Accelerator) -> str:
    """'hsdp', 'fsdp2', 'ddp' or 'single' — for logs and summaries."""
    if is_hsdp(accelerator):
        return "hsdp"
    if accelerator.is_fsdp2:
        return "fsdp2"
    return "ddp" if accelerator.num_processes > 1 else "single"


class ReplicaGradSync:
    """FSDP2 all-reduce hook of an HSDP launch: sees every reduce-scatter output (the shard-axis mean gradient).

    ``average=True`` averages it over the replicate axis (what native HSDP does); ``False`` leaves that to the
    optimizer (Dion's compressed sync). Either way it counts the bytes of both collectives in :attr:`comm`:
    ``reduce_scatter/shard`` is the reduce-scatter input (shard count x output), ``all_reduce/replicate`` the
    averaged payload.
    """

    def __init__(self, replicate_group: Any, shard_world: int, average: bool) -> None:
        self.replicate_group, self.shard_world, self.average = replicate_group, shard_world, average
        self.comm = CommCounter()

    def __call__(self, reduce_output: torch.Tensor) -> None:
        size = reduce_output.numel() * reduce_output.element_size()
        self.comm.bytes[("reduce_scatter", "shard")] += size * self.shard_world
        if self.average:
            self.comm.all_reduce(reduce_output, self.replicate_group, "replicate", average=True)


def _fully_shard_over(accelerator: Accelerator, model: nn.Module, mesh: Any, hook: ReplicaGradSync) -> None:
    """``fully_shard`` every NeoBERT block, then the root, over ``mesh`` with accelerate's FSDP2 settings."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    plugin = accelerator.state.fsdp_plugin
    kwargs = {"mesh": mesh, "reshard_after_forward": plugin.reshard_after_forward,
              "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy()}
    if plugin.cpu_offload is not None:
        kwargs["offload_policy"] = plugin.cpu_offload
    # Resolve accelerate's wrap policy while the blocks still carry their class names (fully_shard renames them to
    # FSDP<name>); prepare() then finds it resolved and accepts the sharded model as it is.
    plugin.set_auto_wrap_policy(model)
    wrap_cls = set(plugin.transformer_cls_names_to_wrap or ["NeoBERTLayer"])
    for module in list(model.modules()):
        if type(module).__name__ in wrap_cls:
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_all_reduce_hook(hook)


def optimizer_syncs_replicas(accelerator: Accelerator, optimizer_config: Any) -> bool:
    """HSDP with Dion's compressed sync: Dion, not FSDP, averages over the replicate axis."""
    return is_hsdp(accelerator) and optimizer_config.name == "dion" and (
        optimizer_config.dion_config.replicate_mesh_grad_sync is not False)


def hsdp_meshes(accelerator: Accelerator) -> tuple[Any, Any]:
    """``(replicate_mesh, shard_mesh)``: the two 1-D sub-meshes of an HSDP launch, ``(None, None)`` otherwise."""
    if not is_hsdp(accelerator):
        return None, None
    mesh = accelerator.torch_device_mesh
    return mesh["dp_replicate"], mesh["dp_shard"]


def wrap_model(accelerator: Accelerator, model: nn.Module, *,
               optimizer_syncs_replicas: bool = False) -> tuple[nn.Module, Any]:
    """Wrap ``model`` for this launch; return ``(wrapped, distributed_mesh)`` for the optimizer registry.

    ``distributed_mesh`` is None (one process), the DDP process group, or the 1-D DeviceMesh of the FSDP2 shards
    (under HSDP the shard sub-mesh; :func:`hsdp_meshes` gives both). ``optimizer_syncs_replicas`` (HSDP only): the
    optimizer averages over the replicate axis itself, so FSDP reduces over the shard axis only.
    """
    if is_hsdp(accelerator):
        replicate, shard = hsdp_meshes(accelerator)
        hook = ReplicaGradSync(replicate.get_group(), shard.size(), average=not optimizer_syncs_replicas)
        _fully_shard_over(accelerator, model, shard, hook)
        _HOOKS[model] = hook
    if accelerator.is_fsdp2:
        placeholder = torch.optim.SGD(model.parameters(), lr=0.0)  # stateless; accelerate remaps and we drop it
        wrapped, prepared_placeholder = accelerator.prepare(model, placeholder)
        accelerator._optimizers.remove(prepared_placeholder)
        return wrapped, fsdp_mesh(wrapped)
    wrapped = accelerator.prepare(model)
    group = dist.group.WORLD if accelerator.num_processes > 1 else None
    return wrapped, group


def fsdp_mesh(model: nn.Module) -> Any:
    """The DeviceMesh the FSDP2 parameters are sharded over (asserts they really are DTensors)."""
    from torch.distributed.tensor import DTensor

    for p in model.parameters():
        if isinstance(p, DTensor):
            return p.device_mesh
    raise RuntimeError("FSDP2 was requested but no parameter is a DTensor after wrapping")


_HOOKS: weakref.WeakKeyDictionary[nn.Module, ReplicaGradSync] = weakref.WeakKeyDictionary()


MESH_FILE = "mesh.json"


def mesh_description(accelerator: Accelerator) -> str:
    """The launch's layout as one string, e.g. ``hsdp 2x2``, ``fsdp2 4``, ``ddp 2``, ``single 1``."""
    if is_hsdp(accelerator):
        pc = accelerator.parallelism_config
        return f"hsdp {pc.dp_replicate_size}x{pc.dp_shard_size}"
    return f"{mode(accelerator)} {accelerator.num_processes}"


# Optimizers whose state is per parameter and whole on every rank under single/DDP (element-wise updates): their
# checkpoints resume on another number of DDP processes (the data position is global, docs/data.md).
RESHARDABLE_OPTIMIZERS = ("adamw", "adamw-decaying-wd", "adana", "dana-mk4", "dana-star", "dana-star-mk4")


def check_resume_mesh(accelerator: Accelerator, checkpoint: Any, optimizer: str | None = None) -> None:
    """Refuse (one line) to resume a checkpoint written on another mesh shape: sharded optimizer state (Dion's Q,
    per-shard layouts) is tied to it. Checkpoints without a mesh record are accepted, and so is a change between
    one process and DDP of any size for the element-wise optimizers (``RESHARDABLE_OPTIMIZERS``)."""
    import json
    from pathlib import Path

    record = Path(checkpoint) / MESH_FILE
    if not record.is_file():
        return
    saved, current = json.loads(record.read_text())["mesh"], mesh_description(accelerator)
    replicated = {saved.split()[0], current.split()[0]} <= {"single", "ddp"}
    if saved != current and not (replicated and optimizer in RESHARDABLE_OPTIMIZERS):
        raise ConfigError(
            f"cannot resume {checkpoint}: it was written on a '{saved}' mesh and this launch is '{current}'; "
            "resume with the accelerate config that wrote it (same num_processes and parallelism_config)"
        )


def grad_sync_hook(model: nn.Module) -> ReplicaGradSync | None:
    """The HSDP gradient hook :func:`wrap_model` installed on ``model`` (None outside HSDP)."""
    return _HOOKS.get(model)


def clip_grad_norm(accelerator: Accelerator, model: nn.Module, max_norm: float,
                   replicate_group: Any = None) -> torch.Tensor:
    """Clip gradients to ``max_norm`` by their global norm; return that norm (a plain tensor, same on every rank).

    ``replicate_group``: the gradients still differ per replica (the optimizer averages over that axis itself), so
    every replica is clipped with ONE shared norm, the root-mean-square over replicas of each replica's gradient
    norm (an upper bound of the norm of the mean gradient); replicas therefore stay identical.
    """
    if replicate_group is None:
        norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    norm = accelerator.clip_grad_norm_(model.parameters(), math.inf)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    square = norm.detach().double().square()
    dist.all_reduce(square, op=dist.ReduceOp.SUM, group=replicate_group)
    shared = (square / dist.get_world_size(replicate_group)).sqrt().float()
    if math.isfinite(max_norm):
        coef = (max_norm / (shared + 1e-6)).clamp(max=1.0)
        for p in model.parameters():
            if p.grad is not None:
                grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                grad.mul_(coef.to(grad.dtype))
    return shared


def comm_bytes(model: nn.Module, optimizer: Any) -> dict[str, float]:
    """Bytes this rank handed to counted collectives since the last call, then reset the counters.

    Counted: the HSDP gradient path (FSDP2 reduce-scatter over the shard axis, the replicate all-reduce) and every
    collective of optimizers that own a :class:`CommCounter` (Dion). Keys ``train/comm_bytes`` (total) and
    ``train/comm_bytes/<collective>/<axis>``; empty when nothing is counted (single process, DDP, 1-D FSDP2).
    """
    counters = [c for c in (getattr(grad_sync_hook(model), "comm", None), getattr(optimizer, "comm", None)) if c]
    if not any(c.bytes for c in counters):
        for c in counters:
            c.reset()
        return {}
    merged: dict[str, float] = {}
    for c in counters:
        for key, value in c.summary().items():
            name = "train/comm_bytes" if key == "total" else f"train/comm_bytes/{key}"
            merged[name] = merged.get(name, 0.0) + float(value)
        c.reset()
    return merged


def prepare_optimizer(accelerator: Accelerator, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Register the optimizer with accelerate (mixed precision bookkeeping and save_state/load_state)."""
    return accelerator.prepare_optimizer(optimizer)


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce over all processes (no-op with one process). Every rank must call it."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(tensor, op=ops[op])
    return tensor


def full_state_dict(accelerator: Accelerator, model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on the main process; collective under FSDP2, so every rank calls it."""
    return accelerator.get_state_dict(model)
