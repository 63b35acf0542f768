"""SIGTERM / SIGINT save and resume bit-exactly; a non-finite abort never publishes non-finite weights (issue #15)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from training_runs import losses, run  # tests/integration/training_runs.py

from neobert_pt.config import load_config
from neobert_pt.train import NonFiniteLossError, Trainer
from neobert_pt.train.checkpoint import Checkpointer

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "--model.hidden_size", "32", "--model.num_hidden_layers", "1", "--model.num_attention_heads", "2",
    "--model.intermediate_size", "64", "--dataset.max_seq_length", "32", "--dataset.max_documents", "30",
    "--trainer.per_device_train_batch_size", "4", "--trainer.max_steps", "6", "--trainer.logging_steps", "1",
    "--trainer.eval_steps", "null", "--trainer.eval_max_batches", "1", "--trainer.save_steps", "100",
    "--scheduler.warmup_steps", "2", "--trainer.disable_tqdm", "true", "--wandb.mode", "disabled", "--seed", "5",
]


def tiny(out, *extra):
    return load_config(None, [*TINY, "--trainer.output_dir", str(out), *extra])



@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    run(tiny(out))
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_saves_and_resumes_bit_exactly(reference, tmp_path, monkeypatch, sig):
    original = Trainer.train_step

    def signal_during_step_3(self, should_log):
        if self.state.step == 2:
            os.kill(os.getpid(), sig)  # a real signal, delivered while step 3 runs
        return original(self, should_log)

    monkeypatch.setattr(Trainer, "train_step", signal_during_step_3)
    # What the process had before the run (SIGINT is SIG_IGN under a non-interactive shell's background job).
    handlers_before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    trainer, summary = run(tiny(tmp_path))
    monkeypatch.setattr(Trainer, "train_step", original)
    assert trainer.exit_code == 75 and summary["steps"] == 3
    assert summary["status"] == f"interrupted by {signal.Signals(sig).name} after step 3"
    assert json.loads((tmp_path / "summary.json").read_text())["status"].startswith("interrupted")
    ckpts = Checkpointer(None, tmp_path, save_steps=None, save_total_limit=None, max_steps=6)
    assert ckpts.latest().name == "step_3" and not (tmp_path / "final").exists()
    assert {s: signal.getsignal(s) for s in handlers_before} == handlers_before  # the trainer restored them

    trainer, summary = run(tiny(tmp_path, "--trainer.resume_from_checkpoint", "latest"))
    assert trainer.resumed_from_step == 3 and trainer.exit_code == 0 and summary["status"] == "completed"
    assert losses(tmp_path) == losses(reference)  # bit for bit at every step
    ref_weights = load_file(reference / "final" / "model.safetensors")
    weights = load_file(tmp_path / "final" / "model.safetensors")
    assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights)


@pytest.mark.slow  # two real processes (~35 s on 2 loaded cores)
def test_sigterm_to_a_real_process_exits_75_with_a_checkpoint_and_a_second_signal_exits_at_once(tmp_path):
    cmd = [sys.executable, str(REPO / "scripts" / "pretraining" / "pretrain.py"), *TINY,
           "--trainer.max_steps", "100000", "--trainer.output_dir", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-3000:]
    assert "Traceback" not in out and "stopped by SIGTERM after step" in out
    step = json.loads((tmp_path / "summary.json").read_text())["steps"]
    ckpts = Checkpointer(None, tmp_path, save_steps=None, save_total_limit=None, max_steps=100000)
    assert ckpts.latest().name == f"step_{step}"

    # second signal: exit at once, the checkpoint of the first stop stays the latest
    cmd2 = [*cmd[:-2], "--trainer.output_dir", str(tmp_path), "--trainer.resume_from_checkpoint", "latest"]
    proc = subprocess.Popen(cmd2, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    n = len(metrics.read_text().splitlines())
    deadline = time.monotonic() + 180
    while len(metrics.read_text().splitlines()) < n + 1:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    time.sleep(2.5)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode in (-signal.SIGINT, 75)  # 75 only if the save finished before the second signal
    assert ckpts.latest() is not None


def test_nonfinite_weights_are_never_saved_and_latest_stays(tmp_path, monkeypatch):
    original = Trainer.train_step

    def corrupt_before_step_3(self, should_log):
        if self.state.step == 2:
            with torch.no_grad():
                next(self.unwrapped.parameters()).view(-1)[:4] = float("nan")
        return original(self, should_log)

    monkeypatch.setattr(Trainer, "train_step", corrupt_before_step_3)
    trainer = Trainer(tiny(tmp_path, "--trainer.save_steps", "2", "--trainer.max_consecutive_nonfinite", "2"))
    try:
        with pytest.raises(NonFiniteLossError, match="NOT saved; `latest` still points at step_2"):
            trainer.fit()
    finally:
        trainer.close()
    ckpts = Checkpointer(None, tmp_path, save_steps=2, save_total_limit=None, max_steps=6)
    assert [p.name for p in ckpts.step_dirs()] == ["step_2"] and ckpts.latest().name == "step_2"
    assert max(losses(tmp_path)) == 4  # the aborting step's metrics are recorded
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"].startswith("stopped: 2 consecutive non-finite steps at step 4")
