"""Muon across 2 gloo processes: DDP (replicated) and FSDP2 (DTensor Shard(0)) equal one process bit-for-bit."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from gloo import run_on_gloo  # tests/distributed/gloo.py (the test dir is on sys.path)
from torch import nn

from neobert_pt.optim.muon import Muon

WORLD = 2
STEPS = 3
TIMEOUT_S = 90
# A 3-matrix bucket (padded to 4 over 2 ranks), a fused-QKV-style split (3 blocks of 6x8), an uneven row count
# (17 rows -> FSDP2 shards of 9 and 8), a 1-row matrix (empty shard on rank 1) and an AdamW vector.
MATRIX_SHAPES = [(12, 24), (12, 24), (12, 24), (18, 8), (17, 24), (1, 16)]


def _problem() -> tuple[list[torch.Tensor], list[dict]]:
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(s, generator=gen) for s in MATRIX_SHAPES] + [torch.randn(12, generator=gen)]
    groups = [
        {"params": [0, 1, 2, 4, 5], "nesterov": True, "adjust_lr": "rms_norm"},
        {"params": [3], "split_rows": 3},
        {"params": [6], "algorithm": "adamw", "weight_decay": 0.0},
    ]
    return tensors, groups


def _grads(step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=gen) for s in MATRIX_SHAPES] + [torch.randn(12, generator=gen)]


def _run(wrap=lambda t: t, mesh=None) -> list[torch.Tensor]:
    tensors, groups = _problem()
    params = [nn.Parameter(wrap(t)) for t in tensors]
    opt = Muon([{**g, "params": [params[i] for i in g["params"]]} for g in groups], lr=0.02, distributed_mesh=mesh)
    for step in range(STEPS):
        for p, g in zip(params, _grads(step), strict=True):
            p.grad = wrap(g)
        opt.step()
    return [p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach().clone() for p in params]


def _work(rank: int, out_dir: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    ddp = _run(mesh=dist.group.WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    fsdp = _run(wrap=lambda t: distribute_tensor(t, mesh, [Shard(0)]), mesh=mesh)
    return {"ddp": ddp, "fsdp": fsdp}


@pytest.mark.distributed
@pytest.mark.timeout(TIMEOUT_S + 30)
def test_two_process_ddp_and_fsdp2_match_single_process(tmp_path) -> None:
    results = run_on_gloo(_work, tmp_path, world=WORLD, timeout_s=TIMEOUT_S, what="distributed Muon run")
    torch.set_num_threads(1)
    reference = _run()
    for mode in ("ddp", "fsdp"):
        for i, ref in enumerate(reference):
            for r in range(WORLD):
                assert torch.equal(results[r][mode][i], ref), (mode, i, r)
