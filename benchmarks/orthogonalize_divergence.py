"""Exact (upstream bf16 arithmetic) vs opt-in fast CPU orthogonaliser: divergence and time, by matrix size.

For each size, Gaussian inputs (seeds 0..--seeds-1) go through Polar Express and NS5 twice: the default exact path
(torch's bf16 matmul, upstream's bits) and ``fast_cpu=True`` (fp32 sgemm rounded once per product). Reported: the
fraction of output elements that differ, the max |difference| relative to the largest output entry, and the median
time of each path (timed in alternation) with their ratio (exact / fast) in this process.

    python benchmarks/orthogonalize_divergence.py                       # the table in docs/optimizers.md
    python benchmarks/orthogonalize_divergence.py --smoke               # seconds-long structure check
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import emit  # noqa: E402
from neobert_pt.optim.orthogonalize import orthogonalize  # noqa: E402


def _interleaved_median_ms(fns: list, repeats: int) -> list[float]:
    """Median ms of each function, timed in alternation so a change in machine load hits both alike."""
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()  # warm-up
    for _ in range(repeats):
        for fn, t in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            t.append((time.perf_counter() - t0) * 1e3)
    return [sorted(t)[len(t) // 2] for t in times]


def measure(shape: tuple[int, int], method: str, seeds: int, repeats: int) -> dict:
    mismatch, rel = [], []
    for seed in range(seeds):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
        exact, fast = orthogonalize(x, method), orthogonalize(x, method, fast_cpu=True)
        diff = (exact.float() - fast.float()).abs()
        mismatch.append((diff > 0).float().mean().item())
        rel.append((diff.max() / exact.float().abs().max()).item())
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    t_exact, t_fast = _interleaved_median_ms(
        [lambda: orthogonalize(x, method), lambda: orthogonalize(x, method, fast_cpu=True)], repeats)
    return {"shape": "x".join(map(str, shape)), "method": method, "mismatch_fraction": max(mismatch),
            "max_rel_error": max(rel), "exact_ms": t_exact, "fast_ms": t_fast, "exact_over_fast": t_exact / t_fast}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["16x32", "32x64", "64x128", "128x256", "256x512", "768x768",
                                                    "768x3072"])
    p.add_argument("--methods", nargs="+", default=["polar_express", "newton_schulz"])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.shapes, args.seeds, args.repeats = ["8x16", "32x64"], 1, 1
    results = [measure(tuple(int(v) for v in s.split("x")), m, args.seeds, args.repeats)
               for s in args.shapes for m in args.methods]
    meta = {"device": f"cpu, {torch.get_num_threads()} threads", "torch": torch.__version__}
    return emit("orthogonalize_divergence", meta, results,
                ["shape", "method", "mismatch_fraction", "max_rel_error", "exact_ms", "fast_ms", "exact_over_fast"])


if __name__ == "__main__":
    main()
