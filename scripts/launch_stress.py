"""Start N consecutive 2-process launches of a tiny training run and report how many started and finished.

A distributed start-up can fail rarely (one SIGABRT in 23 two-process FSDP2 starts was seen on the CPU development
machine), which one CI run does not reveal. This runs the real command users run, N times in a row, each with a timeout,
and prints one JSON object: success rate, per-launch wall times and, for every failure, where its full per-rank logs
were kept.

    python scripts/launch_stress.py                   # 20 FSDP2 launches on 2 CPU processes (gloo)
    python scripts/launch_stress.py --n 2 --config configs/accelerate/ddp_cpu_2proc.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--model.hidden_size", "32", "--model.num_hidden_layers", "2", "--model.num_attention_heads", "2",
    "--model.intermediate_size", "64", "--dataset.max_seq_length", "32", "--dataset.max_documents", "40",
    "--trainer.per_device_train_batch_size", "2", "--trainer.max_steps", "3", "--trainer.logging_steps", "1",
    "--trainer.eval_steps", "null", "--trainer.eval_max_batches", "1", "--trainer.save_steps", "3",
    "--trainer.disable_tqdm", "true", "--trainer.overwrite_output_dir", "true", "--wandb.mode", "disabled",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
    return env


def launch_once(config: Path, run_dir: Path, timeout_s: float) -> dict:
    """One launch; 'ok' means exit 0 AND both ranks reached the end (the summary reports world size 2)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--main_process_port",
           str(_free_port()), str(REPO / "scripts" / "pretraining" / "pretrain.py"), *TINY,
           "--trainer.output_dir", str(run_dir)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
        reason = None if proc.returncode == 0 else f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        reason = f"timeout after {timeout_s:.0f} s"
    wall = time.perf_counter() - start
    summary = run_dir / "summary.json"
    if reason is None:
        world = json.loads(summary.read_text()).get("world_size") if summary.is_file() else None
        reason = None if world == 2 else f"finished with world size {world}"
    (run_dir / "launcher_output.txt").parent.mkdir(parents=True, exist_ok=True)
    (run_dir / "launcher_output.txt").write_text(output)
    return {"ok": reason is None, "wall_s": round(wall, 2), "reason": reason}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="consecutive launches (default 20)")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "accelerate" / "fsdp2_cpu_2proc.yaml")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per launch before it is killed")
    parser.add_argument("--keep", type=Path, default=None,
                        help="directory for failed runs' logs (default: a new temporary directory)")
    args = parser.parse_args(argv)

    keep = args.keep or Path(tempfile.mkdtemp(prefix="launch_stress_"))
    results = []
    for i in range(args.n):
        run_dir = keep / f"launch_{i:02d}"
        result = launch_once(args.config, run_dir, args.timeout)
        if result["ok"]:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            result["logs"] = str(run_dir)  # launcher_output.txt + logs/rank_<r>.log of every rank
        results.append(result)
        print(f"launch {i + 1}/{args.n}: {'ok' if result['ok'] else result['reason']} in {result['wall_s']} s",
              file=sys.stderr, flush=True)
    walls = [r["wall_s"] for r in results]
    ok = sum(r["ok"] for r in results)
    report = {
        "config": str(args.config), "launches": args.n, "succeeded": ok, "success_rate": ok / args.n if args.n else 0,
        "wall_s": {"min": min(walls), "median": statistics.median(walls), "max": max(walls), "each": walls}
        if walls else {},
        "failures": [{"launch": i, **r} for i, r in enumerate(results) if not r["ok"]],
    }
    print(json.dumps(report, indent=1))
    return 0 if ok == args.n else 1


if __name__ == "__main__":
    sys.exit(main())
