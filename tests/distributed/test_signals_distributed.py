"""2 gloo processes under a real ``accelerate launch``: SIGTERM on ONE rank stops both after the same step, both save
and a 2-process resume continues bit-exactly; a SIGSTOPped rank makes the other fail within
``trainer.distributed_timeout_s`` instead of hanging (issue #15)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed.launch import ACCELERATE_CONFIGS, PRETRAIN, REPO, accelerate_launch, child_env, free_port

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
TINY = [
    "--model.hidden_size", "32", "--model.num_hidden_layers", "1", "--model.num_attention_heads", "2",
    "--model.intermediate_size", "64", "--dataset.max_seq_length", "32", "--dataset.max_documents", "60",
    "--trainer.per_device_train_batch_size", "2", "--trainer.logging_steps", "1", "--trainer.eval_steps", "null",
    "--trainer.eval_max_batches", "1", "--trainer.save_steps", "1000", "--scheduler.warmup_steps", "2",
    "--scheduler.name", "constant",  # the interrupted run has a huge max_steps: the LR must not depend on it
    "--trainer.disable_tqdm", "true", "--trainer.save_final_model", "false", "--seed", "7",
]
MAX_STEPS = 400


def _losses(run_dir: Path) -> dict[int, tuple]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "train/loss" in r:
            out[r["step"]] = (r["train/loss"], r["train/grad_norm"], r["train/lr"])
    return out


def _workers(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the launcher's worker processes (read from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != launcher_pid or b"pretrain.py" not in (entry / "cmdline").read_bytes():
                continue
            env = dict(kv.split(b"=", 1) for kv in (entry / "environ").read_bytes().split(b"\0") if b"=" in kv)
            found[int(env[b"RANK"])] = int(entry.name)
        except (OSError, ValueError, IndexError, KeyError):
            continue
    return found


def _start(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ACCELERATE_CONFIGS / "ddp_cpu_2proc.yaml"), "--main_process_port", str(free_port()), str(PRETRAIN),
           *TINY, "--trainer.output_dir", str(out), *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _wait_for_steps(proc: subprocess.Popen, out: Path, n: int, timeout_s: float = 240) -> dict[int, int]:
    deadline = time.monotonic() + timeout_s
    while True:
        m = out / "metrics.jsonl"
        if m.is_file() and len(_losses(out)) >= n:
            workers = _workers(proc.pid)
            if len(workers) == 2:
                return workers
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(proc.communicate()[0][-5000:])
        time.sleep(0.05)


@pytest.mark.timeout(900)
def test_sigterm_on_one_rank_saves_on_both_and_resumes_bit_exactly(tmp_path):
    out = tmp_path / "run"
    proc = _start(out, "--trainer.max_steps", str(MAX_STEPS))
    workers = _wait_for_steps(proc, out, 3)
    os.kill(workers[1], signal.SIGTERM)  # only rank 1 is told; rank 0 learns it through the per-step all-reduce
    output, _ = proc.communicate(timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    stop = summary["steps"]
    assert 3 <= stop < MAX_STEPS and summary["status"] == f"interrupted by signal after step {stop}", output[-3000:]
    step_dir = out / "checkpoints" / f"step_{stop}"
    assert (step_dir / "rank_state_0.json").is_file() and (step_dir / "rank_state_1.json").is_file()
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{stop}"
    for rank in (0, 1):
        assert "stopped by" in (out / "logs" / f"rank_{rank}.log").read_text()  # both ranks stopped together

    end = stop + 3
    accelerate_launch("ddp_cpu_2proc.yaml", PRETRAIN, [*TINY, "--trainer.output_dir", str(out), "--trainer.max_steps",
                      str(end), "--trainer.resume_from_checkpoint", "latest"], timeout_s=300, run_root=out)
    ref = tmp_path / "ref"
    accelerate_launch("ddp_cpu_2proc.yaml", PRETRAIN, [*TINY, "--trainer.output_dir", str(ref), "--trainer.max_steps",
                      str(end)], timeout_s=300, run_root=ref)
    got, want = _losses(out), _losses(ref)
    assert sorted(got) == list(range(1, end + 1)) and got == want  # bit for bit across the interruption


@pytest.mark.timeout(600)
def test_a_stopped_rank_makes_the_other_fail_within_the_timeout(tmp_path):
    out = tmp_path / "run"
    timeout_s = 10
    proc = _start(out, "--trainer.max_steps", "100000", "--trainer.distributed_timeout_s", str(timeout_s))
    workers = _wait_for_steps(proc, out, 2)
    os.kill(workers[1], signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        while Path(f"/proc/{workers[0]}").exists() and (Path(f"/proc/{workers[0]}/stat").read_text()
                                                         .rsplit(")", 1)[1].split()[0] != "Z"):
            assert time.monotonic() - stopped_at < timeout_s + 60, "rank 0 still waits for the stopped rank"
            time.sleep(0.2)
        waited = time.monotonic() - stopped_at
    finally:
        for pid in workers.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.communicate(timeout=120)
    assert waited < timeout_s + 60
    assert proc.returncode != 0
    log = (out / "logs" / "rank_0.log").read_text() + ""
    assert log  # rank 0 ran; its failure (a gloo timeout) ended the launch
