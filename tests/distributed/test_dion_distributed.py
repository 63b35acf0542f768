"""Dion across 4 gloo processes: compressed replica sync equals full-gradient sync (docs/specs/dion.md
§2.4, §4 items 10-11).

One launch, two scenarios, every rank saving its results; assertions run in the pytest process.

* HSDP 2 x 2 (replicate x shard) with ``Shard(0)`` DTensor params on the shard sub-mesh: replica i feeds its own
  gradients ``G_i`` to Dion with ``replicate_mesh_grad_sync=True`` (only P and R are averaged over the replicate
  axis) and, on a copy of the params, the replica mean ``Ḡ`` with ``False`` (what FSDP's full all-reduce gives).
  Weights must agree to 1e-6 and be bit-identical across replicas; the mean of the per-replica momenta must equal
  the full-sync momentum (2e-5) and ``synchronize_for_checkpoint`` must store that mean on every replica; the
  replicate-axis bytes per step are exactly ``Σ (n·r + (m/S)·r)·4`` (P, then this rank's R block); after a
  ``state_dict`` round trip into a fresh optimizer the same bytes move (compression survives a resume, unlike
  upstream) and the step is bit-identical to the uninterrupted optimizer.
* DDP-style: plain tensors, the 4-rank WORLD group as replicate mesh, same comparison (unsharded orientation).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from gloo import run_on_gloo  # tests/distributed/gloo.py (the test dir is on sys.path)
from torch import nn

from neobert_pt.optim.dion import Dion, dion_rank

WORLD, REPLICAS, SHARDS = 4, 2, 2
STEPS = 3
FRACTION = 0.25
SHAPES = {"wide": (24, 40), "tall": (56, 24)}
TIMEOUT_S = 150

pytestmark = pytest.mark.distributed


def _gauss(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _grad(step: int, replica: int, key: str, replicas: int) -> torch.Tensor:
    return _gauss(SHAPES[key], 1000 * step + 10 * replica + len(key))


def _mean_grad(step: int, key: str, replicas: int) -> torch.Tensor:
    return torch.stack([_grad(step, i, key, replicas) for i in range(replicas)]).mean(0)


def _work(rank: int, out_dir: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    result: dict = {}
    # ---------------------------------------------------------------------------------------- HSDP 2 x 2
    mesh = init_device_mesh("cpu", (REPLICAS, SHARDS), mesh_dim_names=("replicate", "shard"))
    rep, shard = mesh["replicate"], mesh["shard"]
    replica = mesh.get_local_rank("replicate")

    def sharded(t: torch.Tensor) -> torch.Tensor:
        return distribute_tensor(t, shard, [Shard(0)], src_data_rank=None)

    def params() -> dict[str, nn.Parameter]:
        return {k: nn.Parameter(sharded(_gauss(s, i) * 0.1)) for i, (k, s) in enumerate(SHAPES.items())}

    def make(ps, sync):
        return Dion(list(ps.values()), replicate_mesh=rep, outer_shard_mesh=shard, replicate_mesh_grad_sync=sync,
                    rank_fraction=FRACTION, lr=0.02, weight_decay=0.1)

    pa, pb = params(), params()
    opt_a, opt_b = make(pa, True), make(pb, False)
    bytes_per_step = []
    for step in range(STEPS):
        for k in SHAPES:
            pa[k].grad = sharded(_grad(step, replica, k, REPLICAS))
            pb[k].grad = sharded(_mean_grad(step, k, REPLICAS))
        opt_a.comm.reset()
        opt_a.step()
        opt_b.step()
        bytes_per_step.append(opt_a.comm.summary())
    result["hsdp_compressed"] = {k: p.full_tensor() for k, p in pa.items()}
    result["hsdp_full"] = {k: p.full_tensor() for k, p in pb.items()}
    result["hsdp_momentum_local_replica"] = {k: opt_a.state[p]["momentum"].full_tensor() for k, p in pa.items()}
    result["hsdp_momentum_full"] = {k: opt_b.state[p]["momentum"].full_tensor() for k, p in pb.items()}
    result["hsdp_q"] = {k: opt_a.state[p]["Q"].full_tensor() for k, p in pa.items()}
    result["hsdp_bytes"] = bytes_per_step
    result["compressed_flags"] = {k: opt_a.is_compressed(p) for k, p in pa.items()}

    # state_dict round trip into a fresh optimizer (what a resume does), then one more step on both.
    sd = opt_a.state_dict()
    saved = {"state": {i: {k: v.clone() for k, v in st.items()} for i, st in sd["state"].items()},
             "param_groups": copy.deepcopy(sd["param_groups"])}
    pc = {k: nn.Parameter(sharded(p.detach().full_tensor())) for k, p in pa.items()}
    opt_c = make(pc, True)
    opt_c.load_state_dict(saved)
    for k in SHAPES:
        g = _grad(STEPS, replica, k, REPLICAS)
        pa[k].grad, pc[k].grad = sharded(g), sharded(g.clone())
    opt_a.comm.reset()
    opt_a.step()
    opt_c.step()
    result["resumed_bytes"] = opt_c.comm.summary()
    result["continued_bytes"] = opt_a.comm.summary()
    result["resumed_equal"] = all(torch.equal(pa[k].to_local(), pc[k].to_local()) for k in SHAPES)
    opt_a.synchronize_for_checkpoint()
    result["hsdp_momentum_synced"] = {k: opt_a.state[p]["momentum"].full_tensor() for k, p in pa.items()}
    result["hsdp_momentum_after4_local"] = {k: opt_c.state[p]["momentum"].full_tensor() for k, p in pc.items()}

    # ---------------------------------------------------------------------------------------- DDP-style
    group = dist.group.WORLD

    def plain() -> dict[str, nn.Parameter]:
        return {k: nn.Parameter(_gauss(s, i) * 0.1) for i, (k, s) in enumerate(SHAPES.items())}

    qa, qb = plain(), plain()
    da = Dion(list(qa.values()), replicate_mesh=group, rank_fraction=FRACTION, lr=0.02)
    db = Dion(list(qb.values()), replicate_mesh=group, replicate_mesh_grad_sync=False, rank_fraction=FRACTION, lr=0.02)
    for step in range(STEPS):
        for k in SHAPES:
            qa[k].grad = _grad(step, rank, k, WORLD)
            qb[k].grad = _mean_grad(step, k, WORLD)
        da.step()
        db.step()
    result["ddp_compressed"] = {k: p.detach().clone() for k, p in qa.items()}
    result["ddp_full"] = {k: p.detach().clone() for k, p in qb.items()}
    result["ddp_momentum_local"] = {k: da.state[p]["momentum"].clone() for k, p in qa.items()}
    result["ddp_momentum_full"] = {k: db.state[p]["momentum"].clone() for k, p in qb.items()}
    result["replica"] = replica
    return result


def test_compressed_replica_sync_equals_full_gradient_sync(tmp_path):
    results = run_on_gloo(_work, tmp_path, world=WORLD, timeout_s=TIMEOUT_S, what="Dion 2x2 HSDP and DDP")
    # ranks (0, 1) hold replica 0, (2, 3) replica 1 of the 2 x 2 mesh
    assert [r["replica"] for r in results] == [0, 0, 1, 1]
    r0 = results[0]
    for k in SHAPES:
        assert (r0["hsdp_compressed"][k] - r0["hsdp_full"][k]).abs().max() <= 1e-6, k
        for other in results[1:]:
            assert torch.equal(other["hsdp_compressed"][k], r0["hsdp_compressed"][k]), f"replicas differ in {k}"
            assert torch.equal(other["hsdp_q"][k], r0["hsdp_q"][k]), f"Q differs across replicas in {k}"
        per_replica = [results[0]["hsdp_momentum_local_replica"][k], results[2]["hsdp_momentum_local_replica"][k]]
        assert (per_replica[0] - per_replica[1]).abs().max() > 1e-2, "the momenta should differ per replica"
        mean = torch.stack(per_replica).mean(0)
        assert (mean - r0["hsdp_momentum_full"][k]).abs().max() <= 2e-5, k
    assert all(r0["compressed_flags"].values())
    # Replicate-axis bytes per step: P (n x r, the full long side under Shard(0)) and this rank's R block (m/S x r).
    expected = 0
    for m, n in SHAPES.values():
        r = dion_rank(FRACTION, 1, m, n)
        expected += (n * r + (m // SHARDS) * r) * 4
    for step_bytes in r0["hsdp_bytes"]:
        assert step_bytes["all_reduce/replicate"] == expected
    for res in results:
        assert res["resumed_bytes"] == res["continued_bytes"], "compressed sync lost after load_state_dict"
        assert res["resumed_equal"], "a state_dict round trip changed the next step"
    # synchronize_for_checkpoint stores the replica mean (the one-process momentum) on every replica.
    synced = [res["hsdp_momentum_synced"] for res in results]
    for k in SHAPES:
        mean = torch.stack([results[0]["hsdp_momentum_after4_local"][k],
                            results[2]["hsdp_momentum_after4_local"][k]]).mean(0)
        for s in synced:
            assert torch.equal(s[k], synced[0][k])
        assert (synced[0][k] - mean).abs().max() <= 1e-6
    # DDP-style (4 replicas, unsharded orientation): the same equivalence.
    for k in SHAPES:
        assert (r0["ddp_compressed"][k] - r0["ddp_full"][k]).abs().max() <= 1e-6, k
        for other in results[1:]:
            assert torch.equal(other["ddp_compressed"][k], r0["ddp_compressed"][k])
        mean = torch.stack([res["ddp_momentum_local"][k] for res in results]).mean(0)
        assert (mean - r0["ddp_momentum_full"][k]).abs().max() <= 2e-5, k
