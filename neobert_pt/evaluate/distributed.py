"""Work splitting for suites run by several processes (``accelerate launch`` or inside a multi-rank pretraining run).

Every rank runs the SAME number of forward calls (FSDP2 all-gathers parameters inside each forward, so a rank that
stopped early would hang the others): ``shard`` gives rank ``r`` the items ``r, r + W, ...`` padded with repeats that
carry weight 0. Sums are then all-reduced; with one process every helper is the identity.
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(items: list[T]) -> list[tuple[T, float]]:
    """This rank's items with weight 1, padded to ``ceil(len / W)`` entries with weight-0 repeats."""
    rank, size = world()
    if not items:
        return []
    mine = [(items[i], 1.0) for i in range(rank, len(items), size)]
    target = math.ceil(len(items) / size)
    while len(mine) < target:
        mine.append((items[-1], 0.0))
    return mine


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (float64 on the tensor's device; gloo and NCCL both accept it)."""
    if world()[1] > 1:
        dist.all_reduce(tensor)
    return tensor


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (every rank receives all of them)."""
    rank, size = world()
    if size == 1:
        return [obj]
    out: list[Any] = [None] * size
    dist.all_gather_object(out, obj)
    return out
