"""Execute a plan of runs: one subprocess each, failures recorded and skipped over, completed runs never redone."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from neobert_pt.robustness.matrix import RunSpec
from neobert_pt.robustness.records import STATUS_FILE, read_record, write_status


def is_complete(run: RunSpec) -> bool:
    """A run counts as done only when it ended with exit code 0 (failed runs are retried on the next invocation)."""
    return read_record(run.name, run.output_dir).succeeded


def _command_for_attempt(run: RunSpec) -> list[str]:
    """Re-runs of an interrupted train/reference run continue from its last complete checkpoint."""
    if run.role != "resumed" and (run.output_dir / "checkpoints").exists():
        return [*run.command, "--trainer.resume_from_checkpoint", "latest"]
    if run.role == "resumed" and run.output_dir.exists():
        shutil.rmtree(run.output_dir)  # a half-finished resumed run is cheap to redo and must start clean
    return run.command


def execute(run: RunSpec, log_dir: Path, *, cwd: Path, timeout_s: float | None = None) -> int:
    """Run one spec to completion; returns its exit code. Ctrl-C stops the child and re-raises."""
    log_path = log_dir / f"stage{run.stage}" / f"{run.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if run.role == "resumed" and run.resume_from is not None and not run.resume_from.exists():
        write_status(run.output_dir, returncode=-1, wall_time_s=0.0, log_path=str(log_path),
                     note=f"reference checkpoint {run.resume_from} missing (reference run failed?)")
        return -1
    command = _command_for_attempt(run)
    start = time.monotonic()
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        # A new session lets us stop the whole process tree (accelerate launch spawns workers).
        proc = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=os.environ.copy())
        try:
            returncode = proc.wait(timeout=timeout_s)
            note = ""
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            returncode, note = proc.wait(), f"killed after the {timeout_s:.0f} s run timeout"
        except KeyboardInterrupt:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            raise  # no status written: the run counts as not done and is resumed next time
    write_status(run.output_dir, returncode=returncode, wall_time_s=round(time.monotonic() - start, 2),
                 log_path=str(log_path), command=command, note=note)
    return returncode


def run_plan(runs: list[RunSpec], *, output_root: Path, cwd: Path, timeout_s: float | None = None,
             echo=print) -> dict[str, int]:
    """Run every incomplete spec in order; returns {run name: exit code} for the runs executed now."""
    results: dict[str, int] = {}
    for i, run in enumerate(runs, 1):
        tag = f"[{i}/{len(runs)}] stage {run.stage} {run.mode:<6} {run.variant:<9} seed {run.seed} ({run.role})"
        if is_complete(run):
            echo(f"{tag}: already complete, skipped")
            continue
        (run.output_dir / STATUS_FILE).unlink(missing_ok=True)
        echo(f"{tag}: running -> {run.output_dir}")
        code = execute(run, output_root / "logs", cwd=cwd, timeout_s=timeout_s)
        results[run.name] = code
        echo(f"{tag}: {'ok' if code == 0 else f'FAILED (exit {code}); log: {output_root}/logs/stage{run.stage}/{run.name}.log'}")
    return results
