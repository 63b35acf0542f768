"""Where the fused DANA update's time goes on one tensor: the compiled kernels against fused AdamW and two floors.

Rows, each the best of ``--repeats`` interleaved rounds (best, not median: on a shared CPU the fastest round is the
one least disturbed by other jobs) on one fp32 tensor of ``--numel`` elements:

* ``adamw``: torch's fused AdamW step (the baseline);
* ``adana`` / ``dana-star``: the compiled kernels of ``neobert_pt/optim/dana_fused.py``;
* ``memory floor``: a compiled pass with Dana-Star's memory traffic and next to no arithmetic (reads p, g, m, v,
  tau; writes p, m, v, tau);
* ``clock``: Dana-Star's per-element clock ``T^(1-kappa)`` alone, minus the same pass with the clock replaced by
  a multiply: what the kernel's halving ladder + polynomial (``dana_fused.clock_power``) adds, and what the
  ``log`` + ``exp2`` it replaced added;
* ``log pass``: ``out = log(x)`` compiled (inductor's vectorised log) and eager (ATen's CPU log kernel), each minus
  an ``out = 2 x`` pass: the compiled kernels can only use the former.

    python benchmarks/dana_kernel_cost.py                   # 8M elements, this process's threads
    python benchmarks/dana_kernel_cost.py --threads 1       # one thread: the least load-sensitive ratios
    python benchmarks/dana_kernel_cost.py --smoke
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from benchmarks.common import device_name, emit  # noqa: E402
from neobert_pt.optim import dana_fused  # noqa: E402


def _memory_floor(p: Tensor, g: Tensor, m: Tensor, v: Tensor, tau: Tensor, c: Tensor) -> None:
    a = c[0]
    m.copy_(m + a * g)
    v.copy_(v + a * g)
    tau.copy_(tau + a * g)
    p.copy_(p + a * g)


def _clock(tau: Tensor, out: Tensor, c: Tensor) -> None:
    out.copy_(torch.exp2(torch.log(torch.clamp_min(tau * c[0], 1.0)) * c[1]))


def _clock_ladder(tau: Tensor, out: Tensor, c: Tensor, q: Tensor) -> None:
    out.copy_(dana_fused.clock_power(torch.clamp_min(tau * c[0], 1.0), q.unbind(0)))


def _clock_free(tau: Tensor, out: Tensor, c: Tensor) -> None:
    out.copy_(torch.clamp_min(tau * c[0], 1.0) * c[1])


def _log(x: Tensor, out: Tensor) -> None:
    out.copy_(torch.log(x))


def _double(x: Tensor, out: Tensor) -> None:
    out.copy_(x * 2.0)


def measure(numel: int, repeats: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    p, g, m = (torch.randn(numel, generator=gen) * s for s in (0.02, 1e-3, 1e-3))
    v, tau = torch.rand(numel, generator=gen) * 1e-6, torch.rand(numel, generator=gen) * 0.5
    out = torch.empty(numel)
    param = torch.nn.Parameter(p.clone())
    param.grad = g.clone()
    adamw = torch.optim.AdamW([param], lr=1e-3, fused=True)
    hp = dict(t=100, lr=1e-3, f=1e-4, delta=8.0, kappa=0.85, epsilon=1e-8, clipsnr=2.0, gamma3=1.0)
    c_adana = torch.tensor(dana_fused.adana_scalars(**hp))
    c_star = torch.tensor(dana_fused.dana_star_scalars(**hp))
    c_clock = torch.tensor([100.0, 0.15 / math.log(2.0)])
    q_clock = torch.tensor(dana_fused.clock_constants(0.15))

    def compiled(fn, options=dana_fused.COMPILE_OPTIONS):  # as the kernels are compiled
        return torch.compile(fn, dynamic=True, fullgraph=True, options=options)

    adana, star = dana_fused.kernel("adana"), dana_fused.kernel("dana_star")
    floor, clock_free = compiled(_memory_floor), compiled(_clock_free)
    # the log + exp2 clock as the kernel had it, compiled with the options it had (no FMA contraction)
    clock = compiled(_clock, options={"cpp.dynamic_threads": True})
    clock_ladder = compiled(_clock_ladder)
    log_pass, double_pass = compiled(_log), compiled(_double)
    x = tau + 1.0
    cases = {
        "adamw": adamw.step,
        "adana": lambda: adana(p, g, m, v, c_adana),
        "dana-star": lambda: star(p, g, m, v, tau, c_star),
        "memory floor": lambda: floor(p, g, m, v, tau, c_star),
        "clock (ladder)": lambda: clock_ladder(tau, out, c_clock, q_clock),
        "clock (log + exp2)": lambda: clock(tau, out, c_clock),
        "clock-free pass": lambda: clock_free(tau, out, c_clock),
        "log compiled": lambda: log_pass(x, out),
        "log eager": lambda: torch.log(x, out=out),
        "2x compiled": lambda: double_pass(x, out),
        "2x eager": lambda: torch.mul(x, 2.0, out=out),
    }
    for fn in cases.values():  # compile and warm up
        fn()
        fn()
    best = dict.fromkeys(cases, math.inf)
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    rows = []
    for name in ("adamw", "adana", "dana-star", "memory floor"):
        rows.append({"case": name, "ms": best[name] * 1e3, "ratio_vs_adamw": best[name] / best["adamw"]})
    for label, slow, fast in (("clock: ladder + polynomial added", "clock (ladder)", "clock-free pass"),
                              ("clock: log + exp2 added (before)", "clock (log + exp2)", "clock-free pass"),
                              ("log pass, compiled: log added", "log compiled", "2x compiled"),
                              ("log pass, eager ATen: log added", "log eager", "2x eager")):
        extra = max(0.0, best[slow] - best[fast])
        rows.append({"case": label, "ms": extra * 1e3, "ratio_vs_adamw": extra / best["adamw"]})
    for r in rows:
        r["ns_per_element"] = r["ms"] * 1e6 / numel
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--numel", type=int, default=8_000_000)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    p.add_argument("--smoke", action="store_true", help="tiny tensor, 1 round: checks the output structure only")
    args = p.parse_args(argv)
    if args.smoke:
        args.numel, args.repeats = 4096, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if not dana_fused.compiled_available()[0]:
        raise SystemExit(f"dana_kernel_cost.py: torch.compile unavailable ({dana_fused.compiled_available()[1]})")
    rows = measure(args.numel, args.repeats)
    meta = {"device": device_name(torch.device("cpu")), "torch": torch.__version__, "numel": args.numel,
            "repeats": args.repeats, "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    return emit("dana_kernel_cost", meta, rows, ["case", "ms", "ns_per_element", "ratio_vs_adamw"])


if __name__ == "__main__":
    main()
