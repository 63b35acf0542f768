"""Dion2 across 2 gloo processes: DDP equals one process bit-for-bit; FSDP2 (``fully_shard``, DTensor ``Shard(0)``)
equals a single-process simulation of its selection rule for both scopes (uneven and empty shards included); a
sharded DCP checkpoint resumes exactly.

One launch runs every scenario (process start-up dominates); each rank saves its full results and the assertions
run in the pytest process, so a failure names the scenario, tensor and rank.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
from gloo import run_on_gloo  # tests/distributed/gloo.py (the test dir is on sys.path)
from torch import nn

from neobert_pt.optim.dion2 import Dion2, num_selected
from neobert_pt.optim.orthogonalize import orthogonalize
from neobert_pt.optim.orthonormal import adjusted_lr_factor

WORLD = 2
STEPS = 3
TIMEOUT_S = 90
LR, WD, FRACTION, MU = 0.02, 0.1, 0.25, 0.9
# A 3-matrix bucket (padded to 4 over 2 ranks), uneven rows (17 -> shards 9 + 8), one row (rank 1's shard is
# empty), a tall matrix (FSDP2 still selects rows), and an AdamW vector.
SHAPES = [(16, 32), (16, 32), (16, 32), (17, 24), (1, 8), (48, 16), (16,)]
WIDE = [0, 1, 2, 3, 4]  # matrices whose single-process rule also selects rows


def _init() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen) * 0.1 for s in SHAPES]


def _grads(step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=gen) for s in SHAPES]


class Bag(nn.Module):
    """A parameter container so ``fully_shard`` can shard every tensor of the problem."""

    def __init__(self) -> None:
        super().__init__()
        self.ps = nn.ParameterList([nn.Parameter(t) for t in _init()])


def _optimizer(params, mesh=None, scope="local") -> Dion2:
    return Dion2(
        [{"params": params[:-1]}, {"params": params[-1:], "algorithm": "adamw", "weight_decay": 0.0}],
        distributed_mesh=mesh, lr=LR, weight_decay=WD, fraction=FRACTION, ef_decay=MU, selection_scope=scope,
    )


def _step(params, opt, steps, wrap=lambda t: t) -> None:
    for step in steps:
        for p, g in zip(params, _grads(step), strict=True):
            p.grad = wrap(g)
        opt.step()


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.detach().full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


def _snapshot(params, opt) -> dict[str, list[torch.Tensor]]:
    return {"w": [_full(p) for p in params], "m": [_full(opt.state[p]["momentum"]) for p in params]}


def simulate_fsdp(scope: str) -> dict[str, list[torch.Tensor]]:
    """One process, full matrices: FSDP2 Dion2's rule (rows always; per-shard top-k or global top-k)."""
    ws, ms = [t.clone() for t in _init()[:-1]], [torch.zeros(s) for s in SHAPES[:-1]]
    decay = 1 - torch.tensor(LR) * WD
    for step in range(STEPS):
        for w, m, g in zip(ws, ms, _grads(step), strict=False):
            m.add_(g)
            rows, cols = w.shape
            chunk = math.ceil(rows / WORLD)
            if scope == "global":
                idx = m.abs().sum(1).topk(num_selected(FRACTION, rows)).indices
                block = m[idx].bfloat16()
                slots = torch.arange(idx.numel())
            else:
                k = num_selected(FRACTION, chunk)
                picks, slots = [], []
                for r in range(WORLD):
                    lo, hi = min(r * chunk, rows), min((r + 1) * chunk, rows)
                    top = m[lo:hi].abs().sum(1).topk(min(k, hi - lo)).indices + lo
                    picks.append(top)
                    slots.append(torch.arange(top.numel()) + r * k)
                idx, slots = torch.cat(picks), torch.cat(slots)
                block = torch.zeros(WORLD * k, cols, dtype=torch.bfloat16)
                block[slots] = m[idx].bfloat16()
            m[idx] = m[idx] * MU
            ortho = orthogonalize(block, eps=1e-8)[slots]
            w.mul_(decay)
            w[idx] += ortho.float() * -(torch.tensor(LR) * adjusted_lr_factor("spectral_norm", (rows, cols)))
    return {"w": ws, "m": ms}


def _work(rank: int, out_dir: str) -> dict:
    from torch.distributed.checkpoint import load, save
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    results = {}
    params = [nn.Parameter(t) for t in _init()]
    opt = _optimizer(params, mesh=dist.group.WORLD)
    _step(params, opt, range(STEPS))
    results["ddp"] = _snapshot(params, opt)

    mesh = init_device_mesh("cpu", (WORLD,))

    def sharded(scope):
        model = fully_shard(Bag(), mesh=mesh)
        params = list(model.ps)
        assert all(type(p.data).__name__ == "DTensor" for p in params)
        return model, params, _optimizer(params, mesh=mesh, scope=scope)

    def wrap(g):  # synced gradients in fully_shard's layout
        return distribute_tensor(g, mesh, [Shard(0)])

    for scope in ("local", "global"):
        _, params, opt = sharded(scope)
        _step(params, opt, range(STEPS), wrap)
        results[f"fsdp_{scope}"] = _snapshot(params, opt)

    # sharded checkpoint: 2 steps, DCP save, fresh model + optimizer, DCP load, 2 more steps
    ckpt = os.path.join(out_dir, "dcp")
    model, params, opt = sharded("local")
    _step(params, opt, range(2), wrap)
    msd, osd = get_state_dict(model, opt)
    save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
    model, params, opt = sharded("local")
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    load(state, checkpoint_id=ckpt)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    results["dcp_group_steps"] = [g["step"] for g in opt.param_groups]
    _step(params, opt, range(2, 4), wrap)
    results["dcp_resumed"] = _snapshot(params, opt)
    model, params, opt = sharded("local")
    _step(params, opt, range(4), wrap)
    results["dcp_uninterrupted"] = _snapshot(params, opt)

    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dion2_dist")
    return run_on_gloo(_work, out, world=WORLD, timeout_s=TIMEOUT_S, what="distributed Dion2 run")


def _single_process() -> dict[str, list[torch.Tensor]]:
    torch.set_num_threads(1)
    params = [nn.Parameter(t) for t in _init()]
    opt = _optimizer(params)
    _step(params, opt, range(STEPS))
    return _snapshot(params, opt)


@pytest.mark.distributed
@pytest.mark.timeout(TIMEOUT_S + 60)
def test_ddp_is_bit_identical_to_one_process(results) -> None:
    ref = _single_process()
    for r in range(WORLD):
        for key in ("w", "m"):
            for i, expected in enumerate(ref[key]):
                assert torch.equal(results[r]["ddp"][key][i], expected), (key, i, r)


@pytest.mark.distributed
@pytest.mark.timeout(TIMEOUT_S + 60)
@pytest.mark.parametrize("scope", ["local", "global"])
def test_fsdp2_matches_single_process_simulation(results, scope) -> None:
    """Tolerance 1e-6 absolute on weights (observed: bit-exact); momentum exact."""
    ref = simulate_fsdp(scope)
    for r in range(WORLD):
        got = results[r][f"fsdp_{scope}"]
        for i in range(len(ref["w"])):
            assert (got["w"][i] - ref["w"][i]).abs().max() <= 1e-6, (scope, i, r)
            assert torch.equal(got["m"][i], ref["m"][i]), (scope, i, r)


@pytest.mark.distributed
@pytest.mark.timeout(TIMEOUT_S + 60)
def test_fsdp2_global_scope_equals_plain_single_process_on_wide_matrices(results) -> None:
    ref = _single_process()
    for i in [*WIDE, len(SHAPES) - 1]:
        assert torch.equal(results[0]["fsdp_global"]["w"][i], ref["w"][i]), i
        assert torch.equal(results[0]["fsdp_global"]["m"][i], ref["m"][i]), i


@pytest.mark.distributed
@pytest.mark.timeout(TIMEOUT_S + 60)
def test_sharded_checkpoint_resume_equals_uninterrupted(results) -> None:
    for r in range(WORLD):
        assert results[r]["dcp_group_steps"] == [2, 2]
        for key in ("w", "m"):
            for a, b in zip(results[r]["dcp_resumed"][key], results[r]["dcp_uninterrupted"][key], strict=True):
                assert torch.equal(a, b), (key, r)
