"""Trainer end to end on a tiny model and the embedded corpus: artefacts, bit-exact resume, NaN guard, SIGKILL
during a save, and the runbook command line."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from training_runs import losses, run  # tests/integration/training_runs.py

from neobert_pt.config import load_config
from neobert_pt.modeling import NeoBERTForMaskedLM
from neobert_pt.train import NonFiniteLossError, Trainer
from neobert_pt.train.checkpoint import Checkpointer, verify
from neobert_pt.train.summary import read_metrics

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "--model.hidden_size", "32", "--model.num_hidden_layers", "1", "--model.num_attention_heads", "2",
    "--model.intermediate_size", "64", "--dataset.max_seq_length", "32", "--dataset.max_documents", "30",
    "--trainer.per_device_train_batch_size", "4", "--trainer.gradient_accumulation_steps", "2",
    "--trainer.max_steps", "6", "--trainer.logging_steps", "1", "--trainer.eval_steps", "3",
    "--trainer.eval_max_batches", "2", "--trainer.save_steps", "3", "--scheduler.warmup_steps", "2",
    "--trainer.disable_tqdm", "true", "--seed", "3",
]
TRAIN_KEYS = {"step", "train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/steps_per_sec",
              "train/peak_memory_mb", "train/nonfinite_skipped"}


def tiny(out: Path, *extra: str):
    return load_config(None, [*TINY, "--trainer.output_dir", str(out), *extra])



@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted 6-step run (W&B offline), shared by the artefact and resume tests."""
    out = tmp_path_factory.mktemp("ref")
    os.environ["WANDB_SILENT"] = "true"
    trainer, summary = run(tiny(out, "--wandb.mode", "offline"))
    params = {k: v.detach().clone() for k, v in trainer.unwrapped.state_dict().items()}
    return out, summary, params, trainer.data.train.state_dict()


def test_run_directory_metrics_summary_and_final_model(reference):
    out, summary, params, _ = reference
    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all(TRAIN_KEYS <= set(r) for r in train)
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in evals] == [3, 6] and all(0 <= r["eval/accuracy"] <= 1 for r in evals)
    assert summary["steps"] == 6 and summary["final_eval_loss"] == evals[-1]["eval/loss"]
    assert summary["final_train_loss"] == train[-1]["train/loss"]
    for name in ("config.yaml", "summary.json", "summary.md", "loss_curve.png", "logs/rank_0.log"):
        assert (out / name).is_file(), name
    assert json.loads((out / "summary.json").read_text())["tokens"] == summary["tokens"] > 0
    ckpts = Checkpointer(None, out, save_steps=3, save_total_limit=3, max_steps=6)
    assert [p.name for p in ckpts.complete()] == ["step_3", "step_6"] and ckpts.latest().name == "step_6"
    assert list((out / "wandb").glob("offline-run-*")), "W&B offline run directory missing"
    final = NeoBERTForMaskedLM.from_pretrained(out / "final")
    assert torch.equal(final.model.embeddings.weight, params["model.embeddings.weight"])
    assert final.lm_head.weight.data_ptr() == final.model.embeddings.weight.data_ptr()  # still tied
    assert (out / "final" / "tokenizer.json").is_file()


def test_resume_is_bit_exact_and_lands_on_the_next_batch(reference, tmp_path, monkeypatch):
    ref_out, _, ref_params, ref_data_state = reference
    original = Trainer.train_step

    def crash_after_step_4(self, should_log):
        if self.state.step == 4:  # step 4 is done and logged; the last checkpoint is step 3
            raise KeyboardInterrupt("simulated kill")
        return original(self, should_log)

    monkeypatch.setattr(Trainer, "train_step", crash_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        run(tiny(tmp_path, "--wandb.mode", "disabled"))
    monkeypatch.setattr(Trainer, "train_step", original)
    assert max(losses(tmp_path)) == 4  # step 4 was logged before the "kill"

    trainer, summary = run(tiny(tmp_path, "--trainer.resume_from_checkpoint", "latest"))
    assert trainer.resumed_from_step == 3 and summary["steps"] == 6
    assert losses(tmp_path) == losses(ref_out)  # bit for bit: loss, grad norm and LR of every step
    assert trainer.data.train.state_dict() == ref_data_state
    for k, v in trainer.unwrapped.state_dict().items():
        assert torch.equal(v, ref_params[k]), k


def test_nonfinite_guard_skips_then_stops_with_a_checkpoint(tmp_path, monkeypatch):
    forward = NeoBERTForMaskedLM.forward
    poison_calls = set()
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] in poison_calls:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(NeoBERTForMaskedLM, "forward", poisoned)
    poison_calls.update({3})  # step 2's first micro-batch (2 micro-batches per step)
    _, summary = run(tiny(tmp_path / "one"))
    records = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if "train/loss" in r]
    assert summary["steps"] == 6 and summary["nonfinite_skipped"] == 1
    assert records[1]["train/loss"] == "nan" and records[-1]["train/nonfinite_skipped"] == 1
    assert all(isinstance(r["train/loss"], float) for r in records[2:])

    calls["n"] = 0
    poison_calls.clear()
    poison_calls.update(range(3, 100))  # every step from step 2 on
    cfg = tiny(tmp_path / "stop", "--trainer.max_consecutive_nonfinite", "2", "--trainer.save_steps", "1")
    trainer = Trainer(cfg)
    try:
        with pytest.raises(NonFiniteLossError, match="2 consecutive non-finite"):
            trainer.fit()
    finally:
        trainer.close()
    ckpts = Checkpointer(None, tmp_path / "stop", save_steps=1, save_total_limit=None, max_steps=6)
    assert ckpts.latest().name == "step_3"
    good = json.loads((ckpts.root / "step_1" / "rank_state_0.json").read_text())
    assert good["data"] != json.loads((ckpts.root / "step_3" / "rank_state_0.json").read_text())["data"]
    from safetensors.torch import load_file

    w1, w3 = (load_file(ckpts.root / f"step_{s}" / "model.safetensors") for s in (1, 3))
    assert all(torch.equal(w1[k], w3[k]) for k in w1)  # skipped updates left the last good weights untouched


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from neobert_pt.config import load_config
    from neobert_pt.train import Trainer, checkpoint
    publish = checkpoint.Checkpointer._seal_and_publish
    def slow(self, tmp, final, step, world_size):
        if step == 2:
            print("SAVING", flush=True)
            time.sleep(60)  # SIGKILLed here: files written, no marker, not renamed
        publish(self, tmp, final, step, world_size)
    checkpoint.Checkpointer._seal_and_publish = slow
    t = Trainer(load_config(None, sys.argv[1:]))
    t.fit()
""")


def test_sigkill_during_save_resumes_from_last_complete_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "--trainer.output_dir", str(out), "--trainer.save_steps", "1"]
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO)
    log = []
    for line in proc.stdout:
        log.append(line)
        if line.startswith("SAVING"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(log)
    ckpts = Checkpointer(None, out, save_steps=1, save_total_limit=None, max_steps=6)
    assert ckpts.latest().name == "step_1"
    assert list(ckpts.root.glob(".tmp_step_2")) and verify(ckpts.root / ".tmp_step_2") is not None

    trainer, summary = run(tiny(out, "--trainer.resume_from_checkpoint", "latest", "--trainer.save_steps", "1"))
    assert trainer.resumed_from_step == 1 and summary["steps"] == 6
    assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6]
    assert not list(ckpts.root.glob(".tmp_*"))


def test_runbook_command_line(tmp_path):
    """The runbook's flags (config.md), on the tiny config with tiny sizes, via scripts/pretraining/pretrain.py."""
    out = tmp_path / "dion2_qk_smoke"
    cmd = [
        sys.executable, "scripts/pretraining/pretrain.py", "configs/pretraining/pretrain_tiny.yaml",
        "--trainer.max_steps", "4",
        "--optimizer.name", "dion2",
        "--optimizer.dion2_config.enable_clipping", "true",
        "--optimizer.dion2_config.clipping_threshold", "50.0",
        "--optimizer.dion2_config.clipping_interval", "10",
        "--trainer.output_dir", str(out),
        "--trainer.save_steps", "1000",
        "--trainer.resume_from_checkpoint", "latest",
        "--wandb.mode", "disabled",
        "--seed", "42",
        *TINY[:TINY.index("--trainer.max_steps")],  # tiny sizes; the runbook flags above stay as written
        "--trainer.eval_max_batches", "1", "--trainer.disable_tqdm", "true",
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (out / "checkpoints" / "step_4").is_dir() and (out / "final" / "config.json").is_file()
    assert "train/max_attention_logit" in read_metrics(out / "metrics.jsonl")[0]
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)  # finished run: resumes
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed at step 4" in again.stdout + again.stderr


def test_resume_takes_hyperparameters_from_the_current_config_and_logs_each_change(reference, tmp_path, caplog):
    ref_out, *_ = reference
    import shutil

    shutil.copytree(ref_out / "checkpoints" / "step_3", tmp_path / "checkpoints" / "step_3")
    (tmp_path / "checkpoints" / "latest").write_text("step_3\n")
    cfg = tiny(tmp_path, "--trainer.resume_from_checkpoint", "latest", "--optimizer.lr", "1e-5",
               "--optimizer.betas", "[0.8,0.9]", "--optimizer.weight_decay", "0.2", "--wandb.mode", "disabled")
    with caplog.at_level("INFO"):
        trainer = Trainer(cfg)
    try:
        assert trainer.state.step == 3
        for group in trainer.optimizer.param_groups:
            assert group["initial_lr"] == 1e-5 and tuple(group["betas"]) == (0.8, 0.9)
            assert group["lr"] == pytest.approx(1e-5 * trainer.scheduler.lr_lambdas[0](3))
            assert group["weight_decay"] in (0.0, 0.2)  # norms / embeddings never decay
        assert any(g["weight_decay"] == 0.2 for g in trainer.optimizer.param_groups)
        assert trainer.scheduler.get_last_lr()[0] == trainer.optimizer.param_groups[0]["lr"]
        assert trainer.optimizer.state  # the moments came from the checkpoint
    finally:
        trainer.close()
    for line in ("optimizer.lr 0.0006 → 1e-05", "optimizer.betas [0.9, 0.98] → [0.8, 0.9]",
                 "optimizer.weight_decay 0.01 → 0.2"):
        assert line in caplog.text


def test_mixture_with_loader_workers_logs_tokens_per_source(tmp_path):
    """A two-source mixture trained through 2 DataLoader workers: per-source token counts in metrics and summary
    that add up to the trained tokens, and the same losses as without workers."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"line {i} about code and tests " * (1 + i % 4)}) + "\n"
                            for i in range(60)))
    mixture = json.dumps([{"label": "embedded", "name": "embedded", "weight": 0.75},
                          {"label": "local", "name": "json", "data_files": [str(docs)], "weight": 0.25}])
    extra = ["--dataset.mixture", mixture, "--trainer.save_steps", "null", "--trainer.max_steps", "3",
             "--trainer.save_final_model", "false", "--wandb.mode", "disabled"]
    _, summary = run(tiny(tmp_path / "workers", *extra, "--trainer.dataloader_num_workers", "2"))
    _, plain = run(tiny(tmp_path / "plain", *extra))
    assert losses(tmp_path / "workers") == losses(tmp_path / "plain")
    per_source = {k: v for k, v in summary.items() if k.startswith("data/tokens/")}
    assert set(per_source) == {"data/tokens/embedded", "data/tokens/local"}
    assert sum(per_source.values()) == summary["tokens"]
    last = [r for r in read_metrics(tmp_path / "workers" / "metrics.jsonl") if "train/loss" in r][-1]
    assert last["data/tokens/local"] == per_source["data/tokens/local"]
