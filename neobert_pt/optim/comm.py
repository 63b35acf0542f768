"""Counted collectives: every optimizer collective goes through :class:`CommCounter`, which adds its payload bytes.

The counter is keyed by ``(collective, axis)``; ``axis`` names the mesh dimension (``replicate`` for the
data-parallel axis, ``shard`` for the FSDP axis). The byte figure is the payload each rank contributes (the tensor
it hands to the collective), not the ring traffic on the wire, which is ``2(W−1)/W`` times the payload for an
all-reduce; both are what ``docs/specs/dion.md`` §2.7 tabulates. ``gloo`` has no ``AVG`` reduction, so averages are a
``SUM`` followed by a division, on every backend alike.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


class CommCounter:
    """All-reduce wrappers that also count bytes per ``(collective, axis)`` since the last :meth:`reset`."""

    def __init__(self) -> None:
        self.bytes: dict[tuple[str, str], int] = defaultdict(int)

    def reset(self) -> None:
        self.bytes.clear()

    def all_reduce(self, tensor: Tensor, group: Any, axis: str, *, average: bool = False) -> Tensor:
        """In-place sum (or mean) of ``tensor`` over ``group``; a no-op on a group of one."""
        world = dist.get_world_size(group)
        if world == 1:
            return tensor
        self.bytes[("all_reduce", axis)] += tensor.numel() * tensor.element_size()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        if average:
            tensor.div_(world)
        return tensor

    def all_reduce_coalesced(self, tensors: list[Tensor], group: Any, axis: str, *, average: bool = False) -> None:
        """Mean/sum of many tensors with one collective per dtype (one flat buffer each)."""
        if not tensors or dist.get_world_size(group) == 1:
            return
        by_dtype: dict[torch.dtype, list[Tensor]] = defaultdict(list)
        for t in tensors:
            by_dtype[t.dtype].append(t)
        for same in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in same])
            self.all_reduce(flat, group, axis, average=average)
            offset = 0
            for t in same:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    def summary(self) -> dict[str, int]:
        """``{"<collective>/<axis>": bytes}`` plus ``total``."""
        out = {f"{op}/{axis}": n for (op, axis), n in sorted(self.bytes.items())}
        out["total"] = sum(self.bytes.values())
        return out


__all__ = ["CommCounter"]
