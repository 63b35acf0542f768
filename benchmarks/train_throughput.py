"""Training tokens/s, steps/s and peak memory of every optimizer through the real trainer, back to back.

Each variant is a real ``scripts/pretraining/pretrain.py`` run of the same config (only ``optimizer.name`` and the
clipping switch change), so data, model, precision and batch math are identical. Throughput is the median of the
per-step ``train/tokens_per_sec`` after ``--warmup-steps``, read from each run's ``metrics.jsonl``; ratios are to
AdamW from the same invocation.

    python benchmarks/train_throughput.py                                     # tiny config, CPU
    python benchmarks/train_throughput.py --config configs/pretraining/pretrain_neobert100m_smollm2data.yaml \
        --steps 60 --warmup-steps 20 -- --dataset.name embedded --tokenizer.name embedded   # GPU; after -- : overrides
    python benchmarks/train_throughput.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import device_name, emit, pick_device  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# (label, overrides that select it on top of the base config)
VARIANTS: list[tuple[str, list[str]]] = [
    ("adamw", ["--optimizer.name", "adamw"]),
    ("adana", ["--optimizer.name", "adana"]),
    ("dana-mk4", ["--optimizer.name", "dana-mk4"]),
    ("dana-star", ["--optimizer.name", "dana-star"]),
    ("dana-star-mk4", ["--optimizer.name", "dana-star-mk4"]),
    ("muonclip", ["--optimizer.name", "muonclip", "--optimizer.muon_config.enable_clipping", "true"]),
    ("dion2", ["--optimizer.name", "dion2", "--optimizer.dion2_config.enable_clipping", "false"]),
    ("dion2_qk", ["--optimizer.name", "dion2", "--optimizer.dion2_config.enable_clipping", "true"]),
    ("dion", ["--optimizer.name", "dion"]),
]


def run_variant(label: str, selects: list[str], args, work: Path) -> dict:
    out = work / label
    cmd = [sys.executable, "scripts/pretraining/pretrain.py", args.config, *selects,
           "--trainer.max_steps", str(args.steps), "--trainer.output_dir", str(out),
           "--trainer.overwrite_output_dir", "true", "--trainer.logging_steps", "1", "--trainer.eval_steps", "null",
           "--trainer.save_steps", "null", "--trainer.save_final_model", "false", "--trainer.disable_tqdm", "true",
           "--scheduler.warmup_steps", "0", "--wandb.mode", "disabled", *args.override]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"optimizer": label, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1][:120]}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steady = [r for r in records if r["step"] > args.warmup_steps and "train/tokens_per_sec" in r]
    return {
        "optimizer": label,
        "tokens_per_sec": statistics.median(r["train/tokens_per_sec"] for r in steady),
        "steps_per_sec": statistics.median(r["train/steps_per_sec"] for r in steady),
        "peak_memory_mb": max(r.get("train/peak_memory_mb", 0.0) for r in records),
        "final_loss": [r["train/loss"] for r in records if "train/loss" in r][-1],
        "steps_measured": len(steady),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/pretraining/pretrain_tiny.yaml")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup-steps", type=int, default=10, help="steps excluded from the steady-state window")
    p.add_argument("--optimizers", nargs="+", default=[v[0] for v in VARIANTS])
    p.add_argument("--smoke", action="store_true", help="tiny model, 4 steps: checks the output structure only")
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:split])
    args.override = argv[split + 1:]  # dotted config overrides applied to every variant
    if args.smoke:
        args.steps, args.warmup_steps = 4, 1
        args.override += ["--model.hidden_size", "32", "--model.num_hidden_layers", "1", "--model.num_attention_heads",
                          "2", "--model.intermediate_size", "64", "--dataset.max_seq_length", "32",
                          "--dataset.max_documents", "40", "--trainer.per_device_train_batch_size", "2",
                          "--trainer.per_device_eval_batch_size", "2"]
    with tempfile.TemporaryDirectory(prefix="neobert_bench_") as tmp:
        rows = [run_variant(label, sel, args, Path(tmp)) for label, sel in VARIANTS if label in args.optimizers]
    base = next((r["tokens_per_sec"] for r in rows if r["optimizer"] == "adamw" and "tokens_per_sec" in r), None)
    for r in rows:
        if base and "tokens_per_sec" in r:
            r["ratio_vs_adamw"] = r["tokens_per_sec"] / base
    meta = {"device": device_name(pick_device("auto")), "config": args.config,
            "steps": args.steps, "warmup_steps": args.warmup_steps, "overrides": args.override}
    return emit("train_throughput", meta, rows,
                ["optimizer", "tokens_per_sec", "ratio_vs_adamw", "steps_per_sec", "peak_memory_mb", "final_loss",
                 "error"])


if __name__ == "__main__":
    main()
