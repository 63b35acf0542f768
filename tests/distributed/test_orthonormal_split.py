"""The DDP work split (neobert_pt/optim/orthonormal.py ``split_orthogonalize``) on 3 gloo processes: every matrix
is orthogonalised by exactly one rank (batches of 1..7 matrices, padded to a multiple of 3), and every rank ends
with the bits one process computes."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from gloo import run_on_gloo  # tests/distributed/gloo.py (the test dir is on sys.path)

from neobert_pt.optim.orthogonalize import orthogonalize
from neobert_pt.optim.orthonormal import split_orthogonalize

WORLD = 3
SIZES = range(1, 8)
TIMEOUT_S = 180  # three spawned interpreters importing torch: ~56 s alone on a loaded 2-core machine


def _batch(n: int) -> torch.Tensor:
    # The matrix index is written into entry [0, 0], so a rank's calls reveal which matrices it received.
    x = torch.randn(n, 4, 6, generator=torch.Generator().manual_seed(n)).bfloat16()
    x[:, 0, 0] = torch.arange(n, dtype=torch.bfloat16) + 1
    return x


def _work(rank: int, out_dir: str) -> dict:
    seen: dict[int, list[int]] = {}
    results = {}
    for n in SIZES:
        seen[n] = []

        def orth(batch: torch.Tensor, n: int = n) -> torch.Tensor:
            seen[n] += [int(v) - 1 for v in batch[:, 0, 0].tolist() if v != 0]  # zero padding has index 0
            return orthogonalize(batch, "polar_express", eps=1e-8)

        results[n] = split_orthogonalize(_batch(n), orth, dist.group.WORLD)
    return {"seen": seen, "results": results}


@pytest.mark.distributed
@pytest.mark.timeout(TIMEOUT_S + 30)
def test_work_split_covers_every_matrix_once_and_matches_one_process(tmp_path) -> None:
    ranks = run_on_gloo(_work, tmp_path, world=WORLD, timeout_s=TIMEOUT_S, what="orthonormal work split")
    for n in SIZES:
        expected = orthogonalize(_batch(n), "polar_express", eps=1e-8)
        for r, out in enumerate(ranks):
            assert torch.equal(out["results"][n], expected), (n, r)
        assigned = sorted(i for out in ranks for i in out["seen"][n])
        if n == 1:  # nothing to split: every rank does the one matrix
            assert assigned == [0] * WORLD
        else:
            assert assigned == list(range(n)), n
