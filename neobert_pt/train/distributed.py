"""The one place that knows how the model is distributed: Accelerator creation, wrapping, mesh lookup, reductions.

Single process, DDP and FSDP2 (1-D mesh) are all selected by the accelerate config file given to
``accelerate launch``; the trainer calls the same functions in every case. ``modeling/`` has no distributed code.

Wrapping happens BEFORE the optimizer is built (the optimizer registry needs the FSDP2 mesh or the DDP process
group). accelerate insists on preparing a model together with an optimizer under FSDP2, so :func:`wrap_model`
prepares the model with a throw-away, stateless placeholder optimizer and forgets it again.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType
from torch import nn

from neobert_pt.config.errors import ConfigError

logger = logging.getLogger(__name__)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def bf16_supported() -> bool:
    """bf16 autocast works on CPU (torch ≥ 2.x) and on CUDA devices that report bf16 support (Ampere+)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return True


def _enable_fsdp2_on_cpu() -> None:
    """Make accelerate honour an FSDP config on a CPU-only multi-process launch.

    accelerate enables FSDP only for GPU-like distributed types, so with ``use_cpu: true`` an FSDP config silently
    becomes DDP (platform.md). Initialising the shared ``PartialState`` on CPU (gloo) and then marking it
    ``MULTI_GPU`` lets ``Accelerator`` switch it to FSDP as on GPUs; ``fully_shard`` then runs on CPU with gloo.
    This touches accelerate's private shared state: accelerate is pinned (<1.16) and a test asserts that the
    parameters really are DTensors.
    """
    state = PartialState(cpu=True)
    state.distributed_type = DistributedType.MULTI_GPU


def make_accelerator(mixed_precision: str = "no") -> Accelerator:
    """The Accelerator for this process, from the environment ``accelerate launch`` set up."""
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        raise ConfigError(
            "DeepSpeed is not supported by neobert_pt; use an FSDP2 accelerate config instead "
            "(configs/accelerate/fsdp2_1d_2gpu.yaml)"
        )
    if mixed_precision == "bf16" and not bf16_supported():
        logger.warning("trainer.mixed_precision=bf16 is not supported on this device; training in fp32")
        mixed_precision = "no"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if _env_flag("ACCELERATE_USE_FSDP") and world_size > 1 and not torch.cuda.is_available():
        _enable_fsdp2_on_cpu()
    elif _env_flag("ACCELERATE_USE_FSDP") and world_size == 1:
        logger.warning("an FSDP accelerate config with one process shards nothing; running without FSDP")
        os.environ["ACCELERATE_USE_FSDP"] = "false"
    # The scheduler is stepped by the trainer once per optimizer step; accelerate's scheduler wrapper would step it
    # num_processes times, so the scheduler is never prepared (it is registered for checkpointing instead).
    # A multi-process launch without GPUs must use gloo on CPU; without cpu=True accelerate may start each rank as
    # an independent world-size-1 run (all of them racing on the same checkpoints).
    cpu_ranks = world_size > 1 and not torch.cuda.is_available()
    acc = Accelerator(cpu=cpu_ranks, mixed_precision=mixed_precision, step_scheduler_with_optimizer=False)
    if world_size > 1 and acc.num_processes != world_size:
        raise RuntimeError(f"launched {world_size} processes but accelerate formed a group of {acc.num_processes}")
    if acc.distributed_type == DistributedType.FSDP and not acc.is_fsdp2:
        raise ConfigError("FSDP v1 is not supported; set fsdp_config.fsdp_version: 2 in the accelerate config")
    return acc


def mode(accelerator: Accelerator) -> str:
    """'fsdp2', 'ddp' or 'single' — for logs and summaries."""
    if accelerator.is_fsdp2:
        return "fsdp2"
    return "ddp" if accelerator.num_processes > 1 else "single"


def wrap_model(accelerator: Accelerator, model: nn.Module) -> tuple[nn.Module, Any]:
    """Wrap ``model`` for this launch; return ``(wrapped, distributed_mesh)`` for the optimizer registry.

    ``distributed_mesh`` is None (one process), the DDP process group, or the 1-D DeviceMesh of the FSDP2 shards.
    """
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
