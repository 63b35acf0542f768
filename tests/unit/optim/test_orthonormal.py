"""The shared pieces of the orthonormal optimizers (neobert_pt/optim/orthonormal.py), single process.

The work split across ranks is tested on 3 gloo processes in tests/distributed/test_orthonormal_split.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from neobert_pt.optim.orthonormal import (
    Distribution,
    adjusted_lr_factor,
    chunk_size,
    local,
    local_rows,
    resolve_mesh,
    row_shard_range,
    split_orthogonalize,
)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("rows", [0, 1, 2, 5, 9, 16, 17, 100])
def test_row_ranges_are_torch_chunk_and_cover_every_row_once(rows: int, world: int) -> None:
    """DTensor Shard(0) lays rows out as torch.chunk does (trailing ranks short or empty)."""
    full = torch.arange(rows)
    chunks = list(torch.chunk(full, world)) if rows else []
    chunks += [full[:0]] * (world - len(chunks))
    ranges = [row_shard_range(rows, world, r) for r in range(world)]
    for r, (start, end) in enumerate(ranges):
        assert torch.equal(full[start:end], chunks[r]), (rows, world, r)
        assert torch.equal(local_rows(full, world, r), chunks[r])
        assert end - start <= chunk_size(rows, world)
    covered = [i for start, end in ranges for i in range(start, end)]
    assert covered == list(range(rows))


def test_row_range_examples() -> None:
    assert [row_shard_range(9, 4, r) for r in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 9)]
    assert [row_shard_range(90, 2, r) for r in range(2)] == [(0, 45), (45, 90)]
    assert chunk_size(17, 2) == 9 and chunk_size(16, 2) == 8 and chunk_size(0, 3) == 0


def test_local_rows_is_a_view() -> None:
    full = torch.zeros(5, 3)
    local_rows(full, 2, 1).fill_(1.0)
    assert full[3:].eq(1).all() and full[:3].eq(0).all()


def test_local_of_a_plain_tensor_is_itself() -> None:
    t = torch.ones(3)
    assert local(t) is t


def test_resolve_mesh_single_and_errors() -> None:
    assert resolve_mesh(None, "Muon") == Distribution("single")
    with pytest.raises(TypeError, match=r"Dion: replicate_mesh must be None, a ProcessGroup or a 1-D DeviceMesh"):
        resolve_mesh("world", "Dion", "replicate_mesh")


@pytest.mark.parametrize("shape", [(16, 32), (48, 16), (7, 7)])
def test_adjusted_lr_factor(shape: tuple[int, int]) -> None:
    m, n = shape
    assert adjusted_lr_factor("spectral_norm", shape) == math.sqrt(m / n)  # no max(1, .) clamp
    assert adjusted_lr_factor("rms_norm", shape) == 0.2 * math.sqrt(max(m, n))
    assert adjusted_lr_factor("none", shape) == adjusted_lr_factor(None, shape) == 1.0
    with pytest.raises(ValueError, match="adjust_lr"):
        adjusted_lr_factor("spectral", shape)


def test_split_orthogonalize_without_a_group_runs_locally() -> None:
    x = torch.randn(3, 4, 6)
    calls = []

    def orth(batch: torch.Tensor) -> torch.Tensor:
        calls.append(batch.shape[0])
        return batch * 2

    assert torch.equal(split_orthogonalize(x, orth), x * 2)
    assert calls == [3]
