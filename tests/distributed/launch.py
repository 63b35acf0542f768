"""Run ``accelerate launch`` (or a plain process) under a hard timeout and keep every rank's log for diagnosis.

Multi-process runs fail in ways a bare return code does not explain (a rank that died first, a peer stuck in a
collective, the once-in-a-while SIGABRT at FSDP2 start-up that scripts/launch_stress.py counts), so a failed or
timed-out launch raises :class:`LaunchError` whose message holds the launcher's combined output (accelerate prefixes it
per rank) and the full ``logs/rank_<r>.log`` of every run directory found below ``run_root``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = REPO / "scripts" / "pretraining" / "pretrain.py"
ACCELERATE_CONFIGS = REPO / "configs" / "accelerate"


class LaunchError(AssertionError):
    """A launch exited non-zero or ran past its timeout; the message carries every rank's log."""


@dataclass
class Launched:
    """A finished launch: its combined output and wall time."""

    returncode: int
    output: str
    wall_s: float


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (29500 may be held by a neighbour's run on a shared machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """Offline, W&B off, one thread per rank (2 ranks share the machine's cores), the repo importable."""
    env = dict(os.environ)
    env.update({
        "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def rank_logs(run_root: Path) -> str:
    """Every ``logs/rank_*.log`` below ``run_root``, in full, each under a header naming it."""
    parts = []
    for log in sorted(Path(run_root).rglob("logs/rank_*.log")):
        parts.append(f"===== {log} =====\n{log.read_text(errors='replace')}")
    return "\n".join(parts) if parts else f"(no per-rank logs below {run_root})"


def run_process(cmd: list[str], *, timeout_s: float, run_root: Path, env: dict[str, str] | None = None,
                check: bool = True) -> Launched:
    """Run ``cmd`` in its own process group; kill the whole group on timeout. Raise LaunchError on failure."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env or child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank it started
        output, _ = proc.communicate()
        timed_out = True
    result = Launched(proc.returncode, output, time.perf_counter() - start)
    if check and (timed_out or proc.returncode != 0):
        why = f"timed out after {timeout_s:.0f} s" if timed_out else f"exited with {proc.returncode}"
        raise LaunchError(
            f"{' '.join(map(str, cmd))}\n{why} after {result.wall_s:.1f} s\n"
            f"----- launcher output (all ranks) -----\n{output}\n----- per-rank logs -----\n{rank_logs(run_root)}"
        )
    return result


def accelerate_launch(config: str | Path, script: str | Path, args: list[str], *, timeout_s: float, run_root: Path,
                      env: dict[str, str] | None = None, check: bool = True) -> Launched:
    """``accelerate launch --config_file CONFIG SCRIPT ARGS`` on a free port (see :func:`run_process`)."""
    config = Path(config)
    if not config.is_absolute() and not config.exists():
        config = ACCELERATE_CONFIGS / config
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--main_process_port", str(free_port()), str(script), *map(str, args)]
    return run_process(cmd, timeout_s=timeout_s, run_root=run_root, env=env, check=check)
