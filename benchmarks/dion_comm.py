"""Replicate-axis bytes per step: Dion's compressed sync vs full-gradient sync, for a NeoBERT recipe's shapes.

Two gloo processes form a replicate axis of 2 (the bytes per rank do not depend on the replica count). For every
distinct block-matrix shape of the model one matrix is stepped by :class:`neobert_pt.optim.Dion` with
``replicate_mesh_grad_sync=True`` (it averages only P and R when ``(m+n)·r < m·n``, else the gradient), and its
counted collective bytes are compared with an all-reduce of the full gradient (what DDP/FSDP's replicate all-reduce
moves); the scalar parameters (embedding = tied head, norms) are all-reduced in full in both modes. Counts are
measured from the collectives actually issued (``neobert_pt/optim/comm.py``), then multiplied by how many matrices
of each shape the model has; the formula of docs/specs/dion.md §2.7 ``(m+n)·r / (m·n)`` is printed next to the measured
ratio.

    python benchmarks/dion_comm.py                         # the 100M recipe (hidden 768, 12 layers), fractions 0.25 and 0.5
    python benchmarks/dion_comm.py --hidden 256 --layers 4 --vocab-size 30522 --fractions 0.25
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from benchmarks.common import emit  # noqa: E402
from neobert_pt.modeling import NeoBERTConfig, NeoBERTForMaskedLM  # noqa: E402
from neobert_pt.optim.comm import CommCounter  # noqa: E402
from neobert_pt.optim.dion import Dion, compressed_sync_saves, dion_rank  # noqa: E402
from neobert_pt.optim.param_groups import group_parameters  # noqa: E402


def model_shapes(hidden: int, layers: int, intermediate: int, vocab: int) -> tuple[Counter, int]:
    """(Counter of block-matrix shapes, number of scalar-parameter elements) of the NeoBERT recipe, built on meta."""
    config = NeoBERTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                           intermediate_size=intermediate, vocab_size=vocab, max_position_embeddings=512)
    with torch.device("meta"):
        model = NeoBERTForMaskedLM(config)
    shapes: Counter = Counter()
    scalars = 0
    for group in group_parameters(model):
        for p in group.params:
            if group.kind == "matrix":
                shapes[tuple(p.shape)] += 1
            else:
                scalars += p.numel()
    return shapes, scalars


def _worker(rank: int, world: int, init: str, shapes: list[tuple[int, int]], fractions: list[float],
            out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    group = dist.group.WORLD
    results = {}
    for fraction in fractions:
        for m, n in shapes:
            w = torch.nn.Parameter(torch.zeros(m, n))
            opt = Dion([w], replicate_mesh=group, rank_fraction=fraction, lr=0.0)
            w.grad = torch.randn(m, n, generator=torch.Generator().manual_seed(rank))
            opt.step()
            compressed = opt.comm.summary()["total"]
            full = CommCounter()
            full.all_reduce(torch.randn(m, n), group, "replicate", average=True)
            results[(fraction, m, n)] = (compressed, full.summary()["total"], opt.is_compressed(w))
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=3072, help="model.intermediate_size (SwiGLU uses 2/3)")
    parser.add_argument("--vocab-size", type=int, default=30522)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5])
    args = parser.parse_args(argv)

    shapes, scalar_numel = model_shapes(args.hidden, args.layers, args.intermediate, args.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bytes.pt")
        mp.start_processes(_worker, args=(2, f"file://{os.path.join(tmp, 'rdv')}", list(shapes), args.fractions,
                                          out), nprocs=2, start_method="spawn")
        measured = torch.load(out)
    scalar_bytes = scalar_numel * 4
    rows = []
    for fraction in args.fractions:
        comp_total = full_total = formula_num = formula_den = 0
        for (m, n), count in shapes.items():
            compressed, full, used = measured[(fraction, m, n)]
            r = dion_rank(fraction, 1, m, n)
            formula = (m + n) * r / (m * n) if compressed_sync_saves(m, n, r) else 1.0
            assert used == compressed_sync_saves(m, n, r)
            rows.append({"rank_fraction": fraction, "matrix": f"{m}x{n}", "count": count, "r": r,
                         "compressed_bytes": compressed, "full_bytes": full,
                         "measured_ratio": compressed / full, "formula_ratio": formula})
            comp_total += count * compressed
            full_total += count * full
            formula_num += count * formula * m * n
            formula_den += count * m * n
        rows.append({"rank_fraction": fraction, "matrix": "all block matrices", "count": sum(shapes.values()),
                     "compressed_bytes": comp_total, "full_bytes": full_total,
                     "measured_ratio": comp_total / full_total, "formula_ratio": formula_num / formula_den})
        rows.append({"rank_fraction": fraction, "matrix": "whole model (+ scalars in full)", "count": "",
                     "compressed_bytes": comp_total + scalar_bytes, "full_bytes": full_total + scalar_bytes,
                     "measured_ratio": (comp_total + scalar_bytes) / (full_total + scalar_bytes),
                     "formula_ratio": (formula_num + scalar_numel) / (formula_den + scalar_numel)})
    meta = {"device": "CPU, 2 gloo processes (replicate axis)", "hidden": args.hidden, "layers": args.layers,
            "vocab_size": args.vocab_size, "scalar_params": scalar_numel,
            "note": "bytes per rank per step handed to replicate-axis all-reduces (fp32)"}
    emit("dion_comm", meta, rows, ["rank_fraction", "matrix", "count", "r", "compressed_bytes", "full_bytes",
                                   "measured_ratio", "formula_ratio"])


if __name__ == "__main__":
    main()
