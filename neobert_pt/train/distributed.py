"""The one place that knows how the model is distributed: Accelerator creation, wrapping, meshes, reductions.

Single process, DDP, FSDP2 (1-D mesh) and HSDP (2-D replicate x shard mesh) are selected by the accelerate config
file given to ``accelerate launch`` (its ``distributed_type: FSDP``, ``fsdp_config`` and ``parallelism_config``
arrive here as environment variables); the trainer calls the same functions in every case. ``modeling/`` has no
distributed code.

Who does what:

* accelerate: the process group (nccl, or gloo on CPU), the device, DDP wrapping and bf16 autocast for single/DDP,
  ``backward``, ``no_sync``, gradient clipping, ``save_state``/``load_state`` (model and optimizer under single/DDP;
  the accelerator's own state always), barriers.
* this module, for FSDP2 and HSDP: it builds the DeviceMesh (``init_device_mesh``: ``(dp_shard,)`` or
  ``(dp_replicate, dp_shard)``) and calls ``fully_shard`` on every NeoBERT block, then on the root, in torchtitan's
  order (activation checkpointing and ``torch.compile`` are applied by the trainer before :func:`wrap_model`). The
  FSDP2 settings (reshard after forward, mixed-precision policy, CPU offload, block class) are read from the
  accelerate config through accelerate's public ``FullyShardedDataParallelPlugin``. The sharded model and optimizer
  are checkpointed here too, as DCP folders (:class:`ShardedCheckpoint`). The same code runs on GPUs and on CPU/gloo,
  so the CPU tests exercise what GPU runs execute.

accelerate itself enables FSDP only for GPU-like launches and refuses a ``parallelism_config`` on CPU; since
neobert_pt does the sharding, :func:`make_accelerator` builds the Accelerator with the FSDP/parallelism switches of
the launch hidden from it (``accelerate.utils.patch_environment``, restored on exit), so accelerate sees a plain
multi-process launch on every device.

HSDP: every replica is one FSDP2 group over the ``dp_shard`` sub-mesh (parameters are 1-D ``Shard(0)`` DTensors, so
every optimizer that supports FSDP2 runs unchanged with the shard sub-mesh), and a :class:`ReplicaGradSync` hook on
every FSDP unit sees each reduce-scatter output: it averages it over the replicate axis (FSDP's usual HSDP
all-reduce), or, when the optimizer syncs replicas itself (Dion's compressed sync), only counts bytes.

Wrapping happens BEFORE the optimizer is built (the optimizer registry needs the FSDP2 mesh or the DDP process
group).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, patch_environment
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


def sharded_launch(world_size: int | None = None) -> bool:
    """An FSDP2 or HSDP launch: the accelerate config sets ``distributed_type: FSDP`` and several processes run."""
    world = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    return _env_flag("ACCELERATE_USE_FSDP") and world > 1


def fsdp_settings() -> Any:
    """The launch's ``fsdp_config`` as accelerate's ``FullyShardedDataParallelPlugin`` (read from the environment),
    checked for what neobert_pt supports; None without an FSDP config."""
    if not _env_flag("ACCELERATE_USE_FSDP"):
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import StateDictType

    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ConfigError("FSDP v1 is not supported; set fsdp_config.fsdp_version: 2 in the accelerate config")
    if plugin.state_dict_type != StateDictType.SHARDED_STATE_DICT:
        raise ConfigError(f"accelerate fsdp_config.fsdp_state_dict_type={plugin.state_dict_type.name} is not "
                          "supported: FSDP2 checkpoints are sharded DCP folders; set it to SHARDED_STATE_DICT "
                          "(the final export is always a full model.safetensors)")
    if plugin.activation_checkpointing:
        raise ConfigError("accelerate fsdp_config.fsdp_activation_checkpointing=true is not used by neobert_pt; "
                          "set it to false and use --trainer.activation_checkpointing true (every launch mode)")
    return plugin


# What `accelerate launch` exports to switch accelerate into FSDP / ParallelismConfig mode. neobert_pt shards the
# model itself, so the Accelerator is built with these switched off (accelerate refuses both on CPU otherwise).
_SHARDING_SWITCHES = {"ACCELERATE_USE_FSDP": "false", "ACCELERATE_USE_PARALLELISM_CONFIG": "false"}


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
    hsdp_shape()  # validate the mesh shape first (accelerate's own error would be a traceback)
    plugin = fsdp_settings()
    if mixed_precision == "bf16" and not bf16_supported():
        logger.warning("trainer.mixed_precision=bf16 is not supported on this device; training in fp32")
        mixed_precision = "no"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if plugin is not None and world_size == 1:
        logger.warning("an FSDP accelerate config with one process shards nothing; running without FSDP")
    # The scheduler is stepped by the trainer once per optimizer step; accelerate's scheduler wrapper would step it
    # num_processes times, so the scheduler is never prepared (resume.py restores its position).
    # A multi-process launch without GPUs must use gloo on CPU; without cpu=True accelerate may start each rank as
    # an independent world-size-1 run (all of them racing on the same checkpoints).
    cpu_ranks = world_size > 1 and not torch.cuda.is_available()
    group_kwargs: dict[str, Any] = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    if plugin is not None and torch.cuda.is_available():
        from torch.distributed.fsdp import CPUOffloadPolicy

        if isinstance(plugin.cpu_offload, CPUOffloadPolicy):
            group_kwargs["backend"] = "cuda:nccl,cpu:gloo"  # offloaded shards are reduced on the CPU
    handlers = [InitProcessGroupKwargs(**group_kwargs)] if group_kwargs else []
    with patch_environment(**_SHARDING_SWITCHES):
        acc = Accelerator(cpu=cpu_ranks, mixed_precision=mixed_precision, step_scheduler_with_optimizer=False,
                          kwargs_handlers=handlers)
    if world_size > 1 and acc.num_processes != world_size:
        raise RuntimeError(f"launched {world_size} processes but accelerate formed a group of {acc.num_processes}")
    return acc


def is_hsdp(accelerator: Accelerator) -> bool:
    """A 2-D (replicate x shard) FSDP2 launch."""
    return sharded_launch(accelerator.num_processes) and hsdp_shape(accelerator.num_processes) is not None


def mode(accelerator: Accelerator) -> str:
    """'hsdp', 'fsdp2', 'ddp' or 'single' — for logs and summaries."""
    if is_hsdp(accelerator):
        return "hsdp"
    if sharded_launch(accelerator.num_processes):
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


@dataclass
class _Sharding:
    """The meshes and FSDP2 settings of one FSDP2/HSDP launch (built once per Accelerator, on first use)."""

    plugin: Any
    shard_mesh: Any
    replicate_mesh: Any = None


_SHARDINGS: weakref.WeakKeyDictionary[Accelerator, _Sharding] = weakref.WeakKeyDictionary()


def _sharding(accelerator: Accelerator) -> _Sharding:
    """Build (collectively, on first call) the DeviceMesh of this launch: ``(dp_shard,)`` for FSDP2, ``(dp_replicate,
    dp_shard)`` for HSDP, with rank ``r * shard + s`` at replica ``r``, shard ``s``."""
    if accelerator not in _SHARDINGS:
        from torch.distributed.device_mesh import init_device_mesh

        plugin = fsdp_settings()
        if accelerator.mixed_precision != "no":
            plugin.set_mixed_precision(accelerator.mixed_precision)  # bf16 params/reductions, fp32 master shards
        shape = hsdp_shape(accelerator.num_processes)
        device = accelerator.device.type
        if shape is None:
            mesh = init_device_mesh(device, (accelerator.num_processes,), mesh_dim_names=("dp_shard",))
            _SHARDINGS[accelerator] = _Sharding(plugin, mesh["dp_shard"])
        else:
            mesh = init_device_mesh(device, shape, mesh_dim_names=("dp_replicate", "dp_shard"))
            _SHARDINGS[accelerator] = _Sharding(plugin, mesh["dp_shard"], mesh["dp_replicate"])
    return _SHARDINGS[accelerator]


def _fully_shard(model: nn.Module, sharding: _Sharding, hook: ReplicaGradSync | None) -> None:
    """``fully_shard`` over the shard mesh with the launch's FSDP2 settings, one unit per NeoBERT block, one for the
    ends of the network, then the root.

    Called after activation checkpointing and ``torch.compile`` (torchtitan's order). The blocks are found by class
    name (``fsdp_transformer_layer_cls_to_wrap``, default the model's ``_no_split_modules``), before ``fully_shard``
    renames their classes to ``FSDP<name>``. The token embedding, the MLM decoder tied to it and the final norm form
    one unit that stays gathered from the start of the forward to the backward (``reshard_after_forward=False``:
    resharding it at the end of the forward would force a re-gather with nothing to overlap at the start of the
    backward); the root then holds no parameters of its own. This is the unit layout accelerate's FSDP2 ``prepare``
    used for 1-D FSDP2 before neobert_pt wrapped the model itself: 1-D FSDP2 runs are bit-identical to it.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    plugin = sharding.plugin
    kwargs = {"mesh": sharding.shard_mesh, "reshard_after_forward": plugin.reshard_after_forward,
              "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy()}
    if plugin.cpu_offload is not None:
        kwargs["offload_policy"] = plugin.cpu_offload
    wrap_cls = set(plugin.transformer_cls_names_to_wrap or getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in wrap_cls]
    if not blocks:
        raise ConfigError(f"accelerate fsdp_config.fsdp_transformer_layer_cls_to_wrap={sorted(wrap_cls)} matches no "
                          "module of the model; set it to NeoBERTLayer")
    for block in blocks:
        fully_shard(block, **kwargs)
    base = model.base_model
    ends = [m for m in (getattr(base, "final_norm", None), model.get_input_embeddings(), model.get_output_embeddings())
            if m is not None]
    fully_shard(list(dict.fromkeys(ends)), **{**kwargs, "reshard_after_forward": False})
    fully_shard(model, **{k: v for k, v in kwargs.items() if k != "reshard_after_forward"})  # root: torch's default
    if hook is not None:
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
    sharding = _sharding(accelerator)
    return sharding.replicate_mesh, sharding.shard_mesh


def wrap_model(accelerator: Accelerator, model: nn.Module, *,
               optimizer_syncs_replicas: bool = False) -> tuple[nn.Module, Any]:
    """Wrap ``model`` for this launch; return ``(wrapped, distributed_mesh)`` for the optimizer registry.

    ``distributed_mesh`` is None (one process), the DDP process group, or the 1-D DeviceMesh of the FSDP2 shards
    (under HSDP the shard sub-mesh; :func:`hsdp_meshes` gives both). ``optimizer_syncs_replicas`` (HSDP only): the
    optimizer averages over the replicate axis itself, so FSDP reduces over the shard axis only. Under FSDP2/HSDP the
    model is not handed to accelerate (it would not shard it on CPU); its checkpoint is :class:`ShardedCheckpoint`.
    """
    if sharded_launch(accelerator.num_processes):
        sharding = _sharding(accelerator)
        hook = None
        if sharding.replicate_mesh is not None:
            hook = ReplicaGradSync(sharding.replicate_mesh.get_group(), sharding.shard_mesh.size(),
                                   average=not optimizer_syncs_replicas)
            _HOOKS[model] = hook
        _fully_shard(model, sharding, hook)
        return model, fsdp_mesh(model)
    wrapped = accelerator.prepare(model)
    group = dist.group.WORLD if accelerator.num_processes > 1 else None
    return wrapped, group


@contextlib.contextmanager
def no_sync(accelerator: Accelerator, model: nn.Module) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter for the micro-batches inside (all but the last of a window).

    FSDP2/HSDP: ``set_requires_gradient_sync(False)`` keeps the unsharded gradients and reduce-scatters their sum once
    on the last micro-batch; single/DDP: accelerate's ``no_sync`` (DDP's).
    """
    if not sharded_launch(accelerator.num_processes):
        with accelerator.no_sync(model):
            yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


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
        replicate, shard = hsdp_shape(accelerator.num_processes)
        return f"hsdp {replicate}x{shard}"
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
    """Single/DDP: register the optimizer with accelerate (mixed precision bookkeeping, save_state/load_state).
    FSDP2/HSDP: returned as it is; :class:`ShardedCheckpoint` saves and loads it with the model."""
    if sharded_launch(accelerator.num_processes):
        return optimizer
    return accelerator.prepare_optimizer(optimizer)


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce over all processes (no-op with one process). Every rank must call it."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(tensor, op=ops[op])
    return tensor


def full_state_dict(accelerator: Accelerator, model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on the main process; collective under FSDP2, so every rank calls it."""
    if sharded_launch(accelerator.num_processes):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
        return get_model_state_dict(model, options=options)
    return accelerator.get_state_dict(model)


class ShardedCheckpoint:
    """Model and optimizer state of an FSDP2/HSDP run as two DCP folders of a checkpoint directory.

    ``pytorch_model_fsdp_0/`` holds ``{"model": ...}`` and ``optimizer_0/`` holds ``{"optimizer": ...}``, keyed by
    parameter name, each rank writing its own shards (the layout accelerate's FSDP2 ``save_state`` writes, so
    ``neobert_pt.evaluate`` and older checkpoints read the same folders). Loading reshards to the current mesh.
    Every rank calls :meth:`save` and :meth:`load` (collectives).
    """

    MODEL_DIR = "pytorch_model_fsdp_0"
    OPTIMIZER_DIR = "optimizer_0"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def save(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        directory = Path(directory)
        dcp.save({"model": get_model_state_dict(self.model)},
                 storage_writer=dcp.FileSystemWriter(str(directory / self.MODEL_DIR)))
        dcp.save({"optimizer": get_optimizer_state_dict(self.model, self.optimizer)},
                 storage_writer=dcp.FileSystemWriter(str(directory / self.OPTIMIZER_DIR)))

    def load(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        directory = Path(directory)
        model_state = {"model": get_model_state_dict(self.model)}
        dcp.load(model_state, storage_reader=dcp.FileSystemReader(str(directory / self.MODEL_DIR)))
        set_model_state_dict(self.model, model_state["model"])
        optim_state = {"optimizer": get_optimizer_state_dict(self.model, self.optimizer)}
        dcp.load(optim_state, storage_reader=dcp.FileSystemReader(str(directory / self.OPTIMIZER_DIR)))
        set_optimizer_state_dict(self.model, self.optimizer, optim_state["optimizer"])


def sharded_checkpoint(accelerator: Accelerator, model: nn.Module,
                       optimizer: torch.optim.Optimizer) -> ShardedCheckpoint | None:
    """The :class:`ShardedCheckpoint` of an FSDP2/HSDP launch; None when accelerate's save_state covers the model."""
    return ShardedCheckpoint(model, optimizer) if sharded_launch(accelerator.num_processes) else None
