"""Distributed execution of Dion2 (``docs/specs/dion2_muonclip.md`` §1.10): row-sharded FSDP2 matrices by all-to-all.

Gradients arrive already synchronised (DDP all-reduce / FSDP2 reduce-scatter); the collectives here only move the
orthogonalisation work, so every replica keeps identical state.

* DDP (``ProcessGroup``): each rank orthogonalises ``1/W`` of a same-shape bucket; ``all_gather`` returns the rest
  (:func:`neobert_pt.optim.orthonormal.split_orthogonalize`, the work split Muon uses too; called from ``dion2.py``).
* FSDP2 (1-D ``DeviceMesh``, ``Shard(0)`` DTensors): selection is always along rows, the sharded dim.

  - ``local`` scope: each rank picks its own top ``ceil(α·ceil(R/W))`` rows; the owner of a matrix gathers every
    rank's rows (all-to-all; rank ``r`` owns matrices ``[r·c, (r+1)·c)``, ``c = ceil(N/W)``, the same split) and
    orthogonalises them jointly, then sends each rank its rows back.
  - ``global`` scope: ranks send their bf16 shard rows plus fp32 row L1 norms; the owner selects the global
    top ``ceil(α·R)`` rows from the fp32 norms, exactly as one process would. Unlike upstream (which selects on
    bf16 norms and forms ``-η̃·O`` in bf16) this makes the global scope bit-identical to the single-process step
    for wide/square matrices. The selected-row mask travels as an extra column instead of being inferred from
    non-zero rows, so a selected row whose output is zero is still EF-decayed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from neobert_pt.optim.orthonormal import chunk_size, local

OrthFn = Callable[[Tensor], Tensor]


def classify(p: Tensor, kind: str, mesh: DeviceMesh | None) -> str:
    """``row_sharded`` for a 2-D DTensor sharded on dim 0 over a mesh of size > 1; ``dense`` otherwise.

    Batch-sharded ≥3-D DTensors hold whole matrices and are ``dense`` (processed locally, no collective).
    """
    if not isinstance(p, DTensor):
        return "dense"
    if kind != "fsdp" or mesh is None:
        raise RuntimeError("DTensor parameters need distributed_mesh to be their 1-D DeviceMesh")
    if p.device_mesh != mesh:
        raise RuntimeError("a DTensor parameter lives on a different DeviceMesh than the optimizer's")
    if mesh.size() == 1:
        return "dense"
    shard_dims = [pl.dim % p.ndim for pl in p.placements if pl.is_shard()]
    if not shard_dims or shard_dims[0] < p.ndim - 2:
        return "dense"
    if p.ndim == 2 and shard_dims[0] == 0:
        return "row_sharded"
    raise NotImplementedError(f"Dion2 supports FSDP2 Shard(0) of 2-D matrices; got placements {p.placements}")


def _orth_batch(x: Tensor, orth: OrthFn) -> Tensor:
    """One matrix goes through the 2-D path (what a single process does for a lone matrix), several batched."""
    return orth(x[0]).unsqueeze(0) if x.shape[0] == 1 else orth(x)


def _exchange(send: Tensor, world: int, group: Any) -> Tensor:
    """All-to-all of a ``(N_pad, ...)`` tensor: rank j receives rows ``[j·per, (j+1)·per)`` of every rank,
    returned as ``(per, world, ...)`` (matrix, source rank, ...)."""
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    per = send.shape[0] // world
    return recv.view(world, per, *send.shape[1:]).transpose(0, 1)


def _return(out: Tensor, world: int, group: Any) -> Tensor:
    """Inverse of :func:`_exchange`: ``(per, world, ...)`` at the owner → ``(N_pad, ...)`` in matrix order."""
    back = out.transpose(0, 1).contiguous().view(-1, *out.shape[2:])
    result = torch.empty_like(back)
    dist.all_to_all_single(result, back, group=group)
    return result


def fsdp_step_local(
    params: list[Tensor], state: dict, group: dict, decay: Tensor, neg_lr: Tensor, orth: OrthFn, pg: Any
) -> None:
    """``selection_scope="local"``: per-shard top-k, selected rows of all ranks orthogonalised jointly."""
    world = dist.get_world_size(pg)
    rows, cols = params[0].shape
    k = max(1, math.ceil(group["fraction"] * chunk_size(rows, world)))
    n_pad = chunk_size(len(params), world) * world  # matrix i is orthogonalised by rank i // (n_pad / W)
    device = local(params[0]).device
    send = torch.zeros(n_pad, k, cols, dtype=torch.bfloat16, device=device)
    picks: list[Tensor | None] = []
    for i, p in enumerate(params):
        m = local(state[p]["momentum"])
        m.add_(local(p.grad).to(m.dtype))
        k_local = min(k, m.shape[0])
        if k_local == 0:
            picks.append(None)
            continue
        idx = m.abs().sum(dim=1).topk(k_local, sorted=False).indices
        selected = m.index_select(0, idx)
        m.index_copy_(0, idx, selected * group["ef_decay"])
        send[i, :k_local] = selected.bfloat16()
        picks.append(idx)
    joint = _exchange(send, world, pg)  # (per, world, k, cols)
    per = joint.shape[0]
    ortho = _orth_batch(joint.reshape(per, world * k, cols), orth)
    result = _return(ortho.view(per, world, k, cols), world, pg)
    for p, idx, res in zip(params, picks, result[: len(params)], strict=True):
        w = local(p)
        w.mul_(decay)
        if idx is not None:
            w.index_add_(0, idx, neg_lr * res[: idx.shape[0]].to(w.dtype))  # upstream operand order (dion2.py)


def fsdp_step_global(
    params: list[Tensor], state: dict, group: dict, decay: Tensor, neg_lr: Tensor, orth: OrthFn, pg: Any
) -> None:
    """``selection_scope="global"``: the owner selects the global top-k rows of the full matrix."""
    world = dist.get_world_size(pg)
    rows, cols = params[0].shape
    chunk = chunk_size(rows, world)  # Shard(0): rank r holds rows [r·chunk, min((r+1)·chunk, R))
    k = max(1, math.ceil(group["fraction"] * rows))
    n_pad = chunk_size(len(params), world) * world
    device = local(params[0]).device
    send = torch.zeros(n_pad, chunk, cols, dtype=torch.bfloat16, device=device)
    norms = torch.full((n_pad, chunk), -1.0, dtype=torch.float32, device=device)  # padding rows never win
    for i, p in enumerate(params):
        m = local(state[p]["momentum"])
        m.add_(local(p.grad).to(m.dtype))
        send[i, : m.shape[0]] = m.bfloat16()
        norms[i, : m.shape[0]] = m.abs().sum(dim=1).float()
    full = _exchange(send, world, pg).reshape(-1, world * chunk, cols)
    full_norms = _exchange(norms, world, pg).reshape(-1, world * chunk)
    idx = full_norms.topk(k, dim=1, sorted=False).indices
    idx_rows = idx.unsqueeze(2).expand(-1, -1, cols)
    ortho = _orth_batch(full.gather(1, idx_rows), orth)
    out = torch.zeros(full.shape[0], world * chunk, cols + 1, dtype=torch.bfloat16, device=device)
    out[..., :cols].scatter_(1, idx_rows, ortho)
    out[..., cols].scatter_(1, idx, 1.0)  # selection mask column
    result = _return(out.view(-1, world, chunk, cols + 1), world, pg)
    one = torch.ones((), dtype=torch.float32, device=device)
    mu = torch.full((), group["ef_decay"], dtype=torch.float32, device=device)
    for p, res in zip(params, result[: len(params)], strict=True):
        w, m = local(p), local(state[p]["momentum"])
        res = res[: w.shape[0]]
        m.mul_(torch.where(res[:, cols:] > 0, mu, one).to(m.dtype))
        w.mul_(decay)
        w.add_(res[:, :cols].to(w.dtype) * neg_lr)
