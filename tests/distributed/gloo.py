"""Run a test body in N spawned gloo processes: per-rank logs, a hard timeout, results gathered in the parent.

``run_on_gloo(work, out_dir)`` spawns ``world`` processes; each initialises a gloo process group (file rendezvous),
redirects its stdout/stderr to ``out_dir/rank<r>.log``, calls ``work(rank, out_dir)`` and saves the returned dict.
If any rank fails or the timeout passes, every rank is killed and the test fails with every rank's full log.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, work: Callable[[int, str], dict], out_dir: str, world: int) -> None:
    log = open(os.path.join(out_dir, f"rank{rank}.log"), "w", buffering=1)
    sys.stdout = sys.stderr = log
    try:
        torch.set_num_threads(1)
        init = f"file://{os.path.join(out_dir, 'rendezvous')}"
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        result = work(rank, out_dir)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        print("done", flush=True)
        dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        raise


def run_on_gloo(work: Callable[[int, str], dict], out_dir: Path, *, world: int = 2, timeout_s: float = 120,
                what: str = "distributed run") -> list[dict]:
    """Run ``work`` on ``world`` gloo ranks; return each rank's result (rank order)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = mp.start_processes(_entry, args=(work, str(out_dir), world), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} exceeded {timeout_s}s")
    except BaseException as exc:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        logs = "\n".join(f"--- rank {r} ---\n" + (out_dir / f"rank{r}.log").read_text() for r in range(world)
                         if (out_dir / f"rank{r}.log").exists())
        pytest.fail(f"{what} failed ({exc}):\n{logs}")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]
