"""Shared base of the orthonormal optimizers: Muon/MuonClip (``muon.py``), Dion2 (``dion2.py``,
``dion2_distributed.py``) and Dion v1 (``dion.py``). One implementation of each piece they all need:

* :func:`local`: the tensor this rank holds (a DTensor's local shard, a view sharing its storage).
* :func:`resolve_mesh`: ``distributed_mesh`` (None, a DDP ``ProcessGroup`` or a 1-D FSDP2 ``DeviceMesh``) →
  :class:`Distribution` (kind, process group, mesh), with one error for anything else.
* :func:`chunk_size`, :func:`row_shard_range`, :func:`local_rows`: the rows a rank owns under DTensor ``Shard(0)`` (``torch.chunk``
  layout: ``ceil(R/W)`` rows per rank, trailing ranks short or empty).
* :func:`split_orthogonalize`: the DDP work split: each rank orthogonalises ``ceil(N/W)`` matrices of an
  ``(N, r, c)`` batch and an all-gather returns the rest, so every rank applies the same bits.
* :func:`adjusted_lr_factor`: the shape-dependent LR multiplier (``spectral_norm`` / ``rms_norm`` / none).

The element-wise scalar-group steps (AdamW through torch's public fused functional, Lion) live in
:mod:`neobert_pt.optim.scalar_opts`. Everything here is plain torch and ``torch.distributed`` public API.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor


def local(t: Tensor) -> Tensor:
    """The tensor this rank holds: a DTensor's local shard (a view sharing its storage), else ``t`` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


# ------------------------------------------------------------------------------------------------- meshes
@dataclass(frozen=True)
class Distribution:
    """How an optimizer's parameters are distributed.

    ``kind``: ``"single"`` (one process, or no collective wanted), ``"ddp"`` (replicated params, gradients already
    averaged; ``group`` splits work) or ``"fsdp"`` (``Shard(0)`` DTensors on the 1-D ``mesh``; ``group`` is its
    process group)."""

    kind: str
    group: Any = None
    mesh: DeviceMesh | None = None


def resolve_mesh(mesh: Any, owner: str, argument: str = "distributed_mesh") -> Distribution:
    """``None`` → single; a ``ProcessGroup`` → ddp; a 1-D ``DeviceMesh`` → fsdp (its group). Anything else raises,
    naming ``owner`` (the optimizer) and ``argument`` (the constructor argument); a 2-D HSDP mesh is refused with
    the hint to pass one of its dimensions."""
    if mesh is None:
        return Distribution("single")
    if isinstance(mesh, DeviceMesh):
        if mesh.ndim != 1:
            raise ValueError(
                f"{owner}: {argument} must be a 1-D DeviceMesh, got {mesh.ndim}-D "
                "(for HSDP pass one dimension of the mesh, e.g. mesh['shard'])"
            )
        return Distribution("fsdp", mesh.get_group(), mesh)
    if isinstance(mesh, dist.ProcessGroup):
        return Distribution("ddp", mesh)
    raise TypeError(
        f"{owner}: {argument} must be None, a ProcessGroup or a 1-D DeviceMesh, got {type(mesh).__name__}"
    )


# ------------------------------------------------------------------------------------------------- shards
def chunk_size(n: int, world_size: int) -> int:
    """``ceil(n / W)``: rows per rank under DTensor ``Shard(0)`` (``torch.chunk``), and matrices per rank in the
    work split (:func:`split_orthogonalize`, Dion2's FSDP2 all-to-all)."""
    return -(-n // world_size)


def row_shard_range(num_rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, end)`` that ``rank`` owns under DTensor ``Shard(0)`` (``torch.chunk`` layout).

    Chunks are ``ceil(R / W)`` rows; trailing ranks get a short or empty chunk (R=9, W=4 → 3, 3, 3, 0).
    """
    chunk = chunk_size(num_rows, world_size)
    start = min(rank * chunk, num_rows)
    return start, min(start + chunk, num_rows)


def local_rows(full: Tensor, world_size: int, rank: int) -> Tensor:
    """``rank``'s ``Shard(0)`` rows of a full tensor (a view), as :func:`row_shard_range` lays them out."""
    start, end = row_shard_range(full.shape[0], world_size, rank)
    return full[start:end]


# ----------------------------------------------------------------------------------------- work split (DDP)
def split_orthogonalize(x: Tensor, orth: Callable[[Tensor], Tensor], group: Any = None) -> Tensor:
    """Orthogonalise an ``(N, r, c)`` batch, the work split over ``group``; every rank returns all ``N`` results.

    Each rank runs ``orth`` on ``ceil(N/W)`` consecutive matrices (the batch is zero-padded to a multiple of
    ``W``; padding results are dropped) and ``all_gather_into_tensor`` assembles the rest, so every rank holds the
    same bits. Without a group, on a group of one, or for ``N = 1`` (nothing to split) ``orth(x)`` runs locally.
    ``orth`` must map a 3-D batch to a batch of the same shape and dtype, matrix by matrix.
    """
    world = 1 if group is None else dist.get_world_size(group)
    n = x.shape[0]
    if world == 1 or n == 1:
        return orth(x)
    per_rank = chunk_size(n, world)
    pad = per_rank * world - n
    if pad:
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
    rank = dist.get_rank(group)
    mine = orth(x[rank * per_rank : (rank + 1) * per_rank]).contiguous()
    gathered = mine.new_empty(per_rank * world, *mine.shape[1:])
    dist.all_gather_into_tensor(gathered, mine, group=group)
    return gathered[:n]


# ------------------------------------------------------------------------------------------- LR adjustment
def adjusted_lr_factor(adjust_lr: str | None, shape: tuple[int, int]) -> float:
    """Multiplier of η for one matrix of FULL shape ``(fan_out, fan_in)`` (a split block: the block's shape).

    ``rms_norm`` = 0.2·sqrt(max(m, n)) makes the update RMS ≈ 0.2 like AdamW (Moonlight), so AdamW LRs carry over;
    ``spectral_norm`` = sqrt(m/n) (µP, upstream's default; no ``max(1, ·)`` clamp); ``"none"`` or ``None`` = 1.
    Returned as a Python float so ``lr_tensor * factor`` is one fp32 multiply, the rounding upstream has.
    """
    m, n = shape
    if adjust_lr == "rms_norm":
        return 0.2 * math.sqrt(max(m, n))
    if adjust_lr == "spectral_norm":
        return math.sqrt(m / n)
    if adjust_lr in ("none", None):
        return 1.0
    raise ValueError(f"unknown adjust_lr {adjust_lr!r}; valid: spectral_norm, rms_norm, none (or None)")


__all__ = [
    "Distribution",
    "adjusted_lr_factor",
    "chunk_size",
    "local",
    "local_rows",
    "resolve_mesh",
    "row_shard_range",
    "split_orthogonalize",
]
