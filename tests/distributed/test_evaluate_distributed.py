"""Evaluation on 2 gloo processes: the CLI splits PPPL / probe work and gets the one-process numbers; a DDP
(and FSDP2) pretraining run with ``trainer.downstream_suites`` logs the same PPPL as an offline evaluation of its final model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from launch import PRETRAIN, REPO, accelerate_launch  # noqa: E402

from neobert_pt.config import load_config  # noqa: E402
from neobert_pt.data import build_tokenizer  # noqa: E402
from neobert_pt.evaluate.cli import main  # noqa: E402
from neobert_pt.evaluate.suites import run_pppl  # noqa: E402
from neobert_pt.modeling import NeoBERTConfig, NeoBERTForMaskedLM  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
EVALUATE = REPO / "neobert_pt" / "evaluate" / "__main__.py"
ARGS = ["--suite", "pppl", "probe", "--pppl-max-tokens", "90", "--pppl-max-length", "24", "--batch-size", "8",
        "--probe-max-windows", "30", "--probe-window", "8", "--no-baseline", "--no-progress"]


def test_two_process_cli_matches_one_process(tmp_path):
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    NeoBERTForMaskedLM(NeoBERTConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)).save_pretrained(model_dir)
    build_tokenizer(load_config(None)).save_pretrained(model_dir)
    assert main([str(model_dir), *ARGS, "--cpu", "--output-dir", str(tmp_path / "one")]) == 0
    accelerate_launch("ddp_cpu_2proc.yaml", EVALUATE, [str(model_dir), *ARGS, "--output-dir", str(tmp_path / "two")],
                      timeout_s=240, run_root=tmp_path)
    one = json.loads((tmp_path / "one" / "eval_results.json").read_text())["suites"]
    two = json.loads((tmp_path / "two" / "eval_results.json").read_text())["suites"]
    assert two["pppl"]["metrics"]["tokens"] == one["pppl"]["metrics"]["tokens"] == 90
    assert two["pppl"]["metrics"]["pppl"] == pytest.approx(one["pppl"]["metrics"]["pppl"], rel=1e-5)
    assert two["probe"]["metrics"]["accuracy"] == one["probe"]["metrics"]["accuracy"]  # same features, same fit


@pytest.mark.parametrize("accelerate_config", ["ddp_cpu_2proc.yaml", "fsdp2_cpu_2proc.yaml"])
def test_pretraining_logs_downstream_equal_to_offline(accelerate_config, tmp_path):
    """Every rank enters the suites (FSDP2: equal forward counts, the whole sharded model is called)."""
    out = tmp_path / "run"
    overrides = [
        "--model.hidden_size", "32", "--model.num_hidden_layers", "1", "--model.num_attention_heads", "2",
        "--model.intermediate_size", "64", "--dataset.max_seq_length", "32", "--dataset.max_documents", "30",
        "--trainer.per_device_train_batch_size", "2", "--trainer.max_steps", "2", "--trainer.save_steps", "2",
        "--trainer.eval_max_batches", "1", "--scheduler.warmup_steps", "1", "--trainer.disable_tqdm", "true",
        "--trainer.downstream_suites", "[pppl, probe]", "--trainer.downstream_pppl_tokens", "40",
        "--trainer.downstream_probe_windows", "30", "--trainer.output_dir", str(out),
    ]
    accelerate_launch(accelerate_config, PRETRAIN, [str(REPO / "configs/pretraining/pretrain_tiny.yaml"),
                                                       *overrides], timeout_s=300, run_root=out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "downstream/pppl/pppl" in r]
    assert [r["step"] for r in logged] == [2] and "downstream/probe/accuracy" in logged[0]
    cfg = load_config(REPO / "configs/pretraining/pretrain_tiny.yaml", overrides)
    model = NeoBERTForMaskedLM.from_pretrained(out / "final").eval()
    offline = run_pppl(model, build_tokenizer(cfg), eval_fraction=cfg.dataset.eval_fraction, max_length=32,
                       max_tokens=40, batch_size=cfg.trainer.per_device_eval_batch_size, progress=False)
    assert offline["metrics"]["pppl"] == pytest.approx(logged[0]["downstream/pppl/pppl"], rel=1e-5)
    # the step-2 checkpoint (model.safetensors under DDP, DCP shards under FSDP2) evaluates to the same number
    ckpt = out / "checkpoints" / "step_2"
    assert (ckpt / ("pytorch_model_fsdp_0" if "fsdp" in accelerate_config else "model.safetensors")).exists()
    assert main([str(ckpt), "--suite", "pppl", "--pppl-max-tokens", "40", "--batch-size",
                 str(cfg.trainer.per_device_eval_batch_size), "--no-progress", "--cpu"]) == 0
    from_ckpt = json.loads((out / "eval" / "step_2" / "eval_results.json").read_text())["suites"]["pppl"]
    assert from_ckpt["metrics"]["pppl"] == pytest.approx(offline["metrics"]["pppl"], rel=1e-5)
