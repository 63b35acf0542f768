"""The GPU suite: one command, about 8 minutes on one H100/H200, JSON + Markdown for docs/benchmarks.md.

Three sections, all at the 100M recipe (hidden 768, 12 layers, 12 heads, FFN 3072, vocab 30522, seq 1024, bf16):

1. ``model``: NeoBERT forward+backward on packed rows (``--docs-per-row`` documents per row, 20% of tokens masked)
   for every attention backend available here (sdpa, eager, flash_attention_2, varlen = torch's varlen_attn,
   flex_attention), eager and ``torch.compile``d: step ms, tokens/s, model TFLOP/s
   (``neobert_pt/train/flops.py``), MFU against the device's bf16 dense peak (or ``--peak-tflops``), peak memory.
2. ``trainer``: training tokens/s through the real trainer (``scripts/pretraining/pretrain.py`` on the embedded
   corpus, no network) for adamw, dion2, dion2 + QK-clip, muonclip, adana, dana-star-mk4, with ratios to AdamW.
   The corpus is written as tokenized shards first and read memory-mapped, so ``datasets`` is not needed.
3. ``optimizer``: milliseconds per ``optimizer.step()`` for the same optimizers (``benchmarks/optimizer_step.py``).

Missing optional packages are notes, never failures: no flash-attn → that backend is skipped; a torch without
``torch.nn.attention.varlen`` (e.g. 2.11) → the varlen rows are skipped with that reason; no W&B → runs use
``wandb.mode disabled`` anyway; no triton / compiler → the compiled rows say why.

    python benchmarks/gpu_suite.py                          # everything, on the GPU
    python benchmarks/gpu_suite.py --out bench_out/         # also writes gpu_suite.json and gpu_suite.md there
    python benchmarks/gpu_suite.py --sections model         # one section
    python benchmarks/gpu_suite.py --smoke                  # tiny shapes on CPU: a structure check (tests)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks import optimizer_step, train_throughput  # noqa: E402
from benchmarks.common import (  # noqa: E402
    device_name,
    markdown_table,
    median_ms,
    peak_memory_mb,
    pick_device,
    reset_peak_memory,
)
from neobert_pt.modeling import NeoBERTConfig, NeoBERTForMaskedLM  # noqa: E402
from neobert_pt.modeling.configuration_neobert import resolve_attn_implementation  # noqa: E402
from neobert_pt.modeling.modeling_neobert import (  # noqa: E402
    VARLEN_IMPLEMENTATIONS,
    flash_attn_available,
    flex_attention_available,
    torch_varlen_available,
    varlen_sizes,
)
from neobert_pt.train.flops import mfu, peak_tflops_for, throughput_flops  # noqa: E402

SECTIONS = ("model", "trainer", "optimizer")
TRAINER_OPTIMIZERS = ("adamw", "dion2", "dion2_qk", "muonclip", "adana", "dana-star-mk4")
STEP_OPTIMIZERS = ("adamw", "dion2", "dion2_qk", "muonclip", "adana", "dana-star-mk4")
MODEL_COLUMNS = ["attention", "compiled", "step_ms", "tokens_per_sec", "tflops", "mfu", "peak_memory_mb", "note"]
TRAINER_COLUMNS = ["optimizer", "tokens_per_sec", "ratio_vs_adamw", "steps_per_sec", "peak_memory_mb", "error"]
STEP_COLUMNS = ["optimizer", "step_ms", "ratio_vs_adamw", "qk_clip_ms"]


def attention_backends(device: torch.device) -> list[tuple[str, str | None]]:
    """(backend, why it is skipped or None) for every backend the model knows."""
    flash = None if device.type == "cuda" and flash_attn_available() else "flash-attn not installed (or no CUDA)"
    flex = None if device.type == "cuda" and flex_attention_available() else "flex_attention: CUDA only for training"
    if not torch_varlen_available():
        varlen = f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn"
    else:
        varlen = None if device.type == "cuda" else "torch's varlen_attn kernel is CUDA-only"
    return [("sdpa", None), ("eager", None), ("flash_attention_2", flash), ("varlen", varlen), ("flex_attention", flex)]


def model_config(args, attn: str) -> NeoBERTConfig:
    return NeoBERTConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         intermediate_size=args.intermediate, vocab_size=args.vocab_size,
                         max_position_embeddings=max(512, args.seq_len), attn_implementation=attn)


def packed_batch(args, device: torch.device) -> dict[str, torch.Tensor]:
    """``--docs-per-row`` equal documents per row, 20% of tokens labelled; masked positions found on the host."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, args.vocab_size, (args.batch, args.seq_len), generator=g)
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.2, ids, torch.full_like(ids, -100))
    doc_len = args.seq_len // args.docs_per_row
    doc = (torch.arange(args.seq_len) // doc_len).clamp(max=args.docs_per_row - 1)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
             "document_ids": doc.expand(args.batch, -1).contiguous(),
             "position_ids": (torch.arange(args.seq_len) - doc * doc_len).expand(args.batch, -1).contiguous(),
             "masked_positions": labels.flatten().ne(-100).nonzero().squeeze(-1)}
    return {k: v.to(device) for k, v in batch.items()}


def model_row(args, device: torch.device, attn: str, compiled: bool, peak: float | None) -> dict:
    row: dict = {"attention": attn, "compiled": compiled}
    torch.manual_seed(0)
    config = model_config(args, attn)
    model = NeoBERTForMaskedLM(config).to(device).train()
    run = torch.compile(model) if compiled else model
    batch = packed_batch(args, device)
    num_items = int(batch["masked_positions"].numel())
    if attn in VARLEN_IMPLEMENTATIONS:
        batch["varlen_sizes"] = varlen_sizes(batch["document_ids"].cpu())  # host metadata, as the trainer passes
    use_bf16 = device.type == "cuda" and not args.fp32

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = run(**batch, num_items_in_batch=num_items).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    reset_peak_memory(device)
    ms = median_ms(step, device=device, repeats=args.repeats, warmup=args.warmup + (2 if compiled else 0))
    tokens = args.batch * args.seq_len
    tflops = throughput_flops(config, tokens=tokens, masked_tokens=num_items, seq_len=args.seq_len) / (ms / 1e3) / 1e12
    row.update({"step_ms": ms, "tokens_per_sec": tokens / (ms / 1e3), "tflops": tflops,
                "peak_memory_mb": peak_memory_mb(device)})
    if peak:
        row["mfu"] = mfu(tflops, peak)
    return row


def model_section(args, device: torch.device, peak: float | None) -> list[dict]:
    rows = []
    for attn, skip in attention_backends(device):
        for compiled in (False, True):
            if skip:
                rows.append({"attention": attn, "compiled": compiled, "note": f"skipped: {skip}"})
                continue
            if compiled and args.no_compile:
                rows.append({"attention": attn, "compiled": True, "note": "skipped: --no-compile"})
                continue
            try:
                rows.append(model_row(args, device, attn, compiled, peak))
            except Exception as exc:  # one backend failing must not lose the rest of the suite
                rows.append({"attention": attn, "compiled": compiled,
                             "note": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"})
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def trainer_section(args, device: torch.device) -> tuple[list[dict], str | None]:
    """Every optimizer through ``pretrain.py`` on the embedded corpus, read as tokenized shards.

    The shards are written here without ``datasets`` (``neobert_pt/data/prepare.py`` ``prepare_texts``) and the
    runs read them memory-mapped (``--dataset.name tokenized``), a path that imports neither ``datasets`` nor W&B:
    the section runs on a bare GPU image. Every variant reads the same shards, tokenized once.
    """
    from neobert_pt.config.loader import load_config
    from neobert_pt.data.prepare import embedded_texts, prepare_texts
    from neobert_pt.data.tokenizer import build_tokenizer

    run = load_config(args.trainer_config, [*args.trainer_overrides, "--tokenizer.name", "embedded"])
    selects = dict(train_throughput.VARIANTS)
    with tempfile.TemporaryDirectory(prefix="neobert_gpu_suite_") as tmp:
        shards = Path(tmp) / "tokenized"
        prepare_texts(embedded_texts(run.dataset.max_documents), build_tokenizer(run), shards,
                      source={"name": "embedded", "max_documents": run.dataset.max_documents})
        data = ["--dataset.name", "tokenized", "--dataset.config_name", "null", "--dataset.streaming", "false",
                "--dataset.data_files", json.dumps([str(shards)]), "--tokenizer.name", str(shards / "tokenizer")]
        ns = argparse.Namespace(config=args.trainer_config, steps=args.trainer_steps,
                                warmup_steps=args.trainer_warmup, override=[*args.trainer_overrides, *data])
        rows = [train_throughput.run_variant(label, selects[label], ns, Path(tmp)) for label in args.trainer_optimizers]
    base = next((r["tokens_per_sec"] for r in rows if r["optimizer"] == "adamw" and "tokens_per_sec" in r), None)
    for r in rows:
        if base and "tokens_per_sec" in r:
            r["ratio_vs_adamw"] = r["tokens_per_sec"] / base
    return rows, None


def optimizer_section(args, device: torch.device) -> list[dict]:
    ns = argparse.Namespace(layers=args.layers, vocab_size=args.vocab_size, batch=min(args.batch, 4),
                            seq_len=min(args.seq_len, 512), repeats=args.repeats, warmup=args.warmup)
    rows = optimizer_step.measure(args.hidden, ns, device, list(args.step_optimizers))
    return [{k: v for k, v in r.items() if k != "width"} for r in rows]


def parse(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--device", default="auto")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--intermediate", type=int, default=3072)
    p.add_argument("--vocab-size", type=int, default=30522)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16, help="rows per forward+backward in the model section")
    p.add_argument("--docs-per-row", type=int, default=4)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast in the model section")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak per device for MFU (default: the table)")
    p.add_argument("--trainer-config", default="configs/pretraining/pretrain_neobert100m_smollm2data.yaml")
    p.add_argument("--trainer-steps", type=int, default=40)
    p.add_argument("--trainer-warmup", type=int, default=15, help="trainer steps left out of the steady window")
    p.add_argument("--trainer-optimizers", nargs="+", default=list(TRAINER_OPTIMIZERS))
    p.add_argument("--step-optimizers", nargs="+", default=list(STEP_OPTIMIZERS))
    p.add_argument("--out", default=None, help="folder to also write gpu_suite.json and gpu_suite.md into")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 1 repeat, no compile: structure check only")
    args = p.parse_args(argv)
    args.trainer_overrides = ["--trainer.mixed_precision", "bf16", "--trainer.per_device_train_batch_size", "16"]
    if args.smoke:
        args.hidden, args.layers, args.heads, args.intermediate, args.vocab_size = 64, 1, 2, 128, 512
        args.seq_len, args.batch, args.repeats, args.warmup, args.no_compile = 32, 2, 1, 1, True
        args.trainer_config, args.trainer_steps, args.trainer_warmup = "configs/pretraining/pretrain_tiny.yaml", 3, 1
        args.trainer_overrides = [
            "--model.hidden_size", "32", "--model.num_hidden_layers", "1", "--model.num_attention_heads", "2",
            "--model.intermediate_size", "64", "--dataset.max_seq_length", "32", "--dataset.max_documents", "40",
            "--trainer.per_device_train_batch_size", "2", "--trainer.per_device_eval_batch_size", "2"]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    device = pick_device(args.device)
    name = device_name(device)
    peak = args.peak_tflops or peak_tflops_for(name)
    start = time.perf_counter()
    payload: dict = {"benchmark": "gpu_suite", "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
                     "device": name, "torch": torch.__version__, "peak_tflops": peak,
                     "auto_attention": resolve_attn_implementation("auto"),  # what the trainer section runs
                     "bf16": device.type == "cuda" and not args.fp32,
                     "shape": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads,
                               "intermediate": args.intermediate, "vocab_size": args.vocab_size,
                               "seq_len": args.seq_len, "batch": args.batch, "docs_per_row": args.docs_per_row},
                     "notes": []}
    if peak is None:
        payload["notes"].append(f"no peak FLOP/s known for {name}: MFU left empty (pass --peak-tflops)")
    if importlib.util.find_spec("wandb") is None:
        payload["notes"].append("wandb not installed: trainer runs use wandb.mode disabled (they always do here)")
    if "model" in args.sections:
        payload["model"] = model_section(args, device, peak)
    if "trainer" in args.sections:
        payload["trainer"], note = trainer_section(args, device)
        if note:
            payload["notes"].append(f"trainer section {note}")
    if "optimizer" in args.sections:
        payload["optimizer"] = optimizer_section(args, device)
    payload["wall_time_sec"] = round(time.perf_counter() - start, 1)

    text = json.dumps(payload, indent=2)
    md = [f"### gpu_suite — {name} (torch {torch.__version__}, attention 'auto' = {payload['auto_attention']}, "
          f"{payload['wall_time_sec']} s)", ""]
    for section, columns in (("model", MODEL_COLUMNS), ("trainer", TRAINER_COLUMNS), ("optimizer", STEP_COLUMNS)):
        if payload.get(section):
            md += [f"#### {section}", "", markdown_table(payload[section], columns), ""]
    md += [f"- {n}" for n in payload["notes"]]
    print(text)
    print()
    print("\n".join(md))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_suite.json").write_text(text + "\n")
        (out / "gpu_suite.md").write_text("\n".join(md) + "\n")
    return payload


if __name__ == "__main__":
    main()
