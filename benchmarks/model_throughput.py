"""NeoBERT forward+backward tokens/s against matched ``transformers`` encoders, per attention backend.

Peers are built from ``transformers`` with the same hidden size, layers, heads, FFN width, vocabulary, batch and
sequence length (``BertForMaskedLM`` and ``ModernBertForMaskedLM``), in the same process, back to back. NeoBERT is
measured unpacked (one document per row) and packed (``--docs-per-row`` documents per row, block-diagonal
attention). Every model computes the MLM loss on the same 20% masked positions.

    python benchmarks/model_throughput.py                                   # 100M-recipe shape on the device
    python benchmarks/model_throughput.py --hidden 256 --layers 4 --heads 4 --seq-len 128 --batch 16   # CPU-sized
    python benchmarks/model_throughput.py --smoke
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from transformers import BertConfig, BertForMaskedLM, ModernBertConfig, ModernBertForMaskedLM  # noqa: E402

from benchmarks.common import device_name, emit, median_ms, peak_memory_mb, pick_device, reset_peak_memory  # noqa: E402
from neobert_pt.modeling import NeoBERTConfig, NeoBERTForMaskedLM  # noqa: E402
from neobert_pt.modeling.modeling_neobert import flash_attn_available  # noqa: E402


def neobert(args, attn: str) -> torch.nn.Module:
    cfg = NeoBERTConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                        intermediate_size=args.intermediate, vocab_size=args.vocab_size,
                        max_position_embeddings=max(512, args.seq_len), attn_implementation=attn)
    return NeoBERTForMaskedLM(cfg)


def bert(args, attn: str) -> torch.nn.Module:
    cfg = BertConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                     intermediate_size=args.intermediate, vocab_size=args.vocab_size,
                     max_position_embeddings=max(512, args.seq_len), hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, attn_implementation=attn)
    return BertForMaskedLM(cfg)


def modernbert(args, attn: str) -> torch.nn.Module:
    cfg = ModernBertConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                           intermediate_size=args.intermediate, vocab_size=args.vocab_size,
                           max_position_embeddings=max(512, args.seq_len), attn_implementation=attn,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    return ModernBertForMaskedLM(cfg)


def make_batch(args, device: torch.device, packed: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, args.vocab_size, (args.batch, args.seq_len), generator=g)
    labels = torch.full_like(ids, -100)
    mask = torch.rand(ids.shape, generator=g) < 0.2
    labels[mask] = ids[mask]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    if packed:
        doc_len = args.seq_len // args.docs_per_row
        doc = (torch.arange(args.seq_len) // doc_len).clamp(max=args.docs_per_row - 1)
        batch["document_ids"] = doc.expand(args.batch, -1).contiguous()
        batch["position_ids"] = (torch.arange(args.seq_len) - doc * doc_len).expand(args.batch, -1).contiguous()
    return {k: v.to(device) for k, v in batch.items()}


def measure(label: str, build, attn: str, args, device: torch.device, packed: bool = False) -> dict | None:
    try:
        model = build(args, attn).to(device).train()
    except (ImportError, ValueError) as exc:  # backend not available for this model on this machine
        return {"model": label, "attention": attn, "packed": packed, "error": str(exc).splitlines()[0][:80]}
    batch = make_batch(args, device, packed)
    dtype = torch.bfloat16 if args.bf16 else None

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(**batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    reset_peak_memory(device)
    ms = median_ms(step, device=device, repeats=args.repeats, warmup=args.warmup)
    tokens = args.batch * args.seq_len
    return {"model": label, "attention": attn, "packed": packed,
            "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "step_ms": ms, "tokens_per_sec": tokens / (ms / 1e3), "peak_memory_mb": peak_memory_mb(device)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--intermediate", type=int, default=3072)
    p.add_argument("--vocab-size", type=int, default=30522)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--docs-per-row", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.hidden, args.layers, args.heads, args.intermediate, args.vocab_size = 64, 1, 2, 128, 512
        args.seq_len, args.batch, args.repeats, args.warmup = 32, 2, 1, 1
    device = pick_device(args.device)
    backends = ["sdpa", "eager"] + (["flash_attention_2"] if device.type == "cuda" and flash_attn_available() else [])
    rows = []
    for attn in backends:
        rows.append(measure("neobert", neobert, attn, args, device))
        rows.append(measure("neobert", neobert, attn, args, device, packed=True))
        rows.append(measure("bert", bert, attn, args, device))
        rows.append(measure("modernbert", modernbert, attn, args, device))
    base = {r["attention"]: r["tokens_per_sec"] for r in rows if r["model"] == "bert" and "tokens_per_sec" in r}
    for r in rows:
        if "tokens_per_sec" in r and r["attention"] in base:
            r["ratio_vs_bert"] = r["tokens_per_sec"] / base[r["attention"]]
    meta = {"device": device_name(device), "torch": torch.__version__, "bf16": args.bf16,
            "shape": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads,
                      "intermediate": args.intermediate, "seq_len": args.seq_len, "batch": args.batch}}
    return emit("model_throughput", meta, rows,
                ["model", "attention", "packed", "params_M", "step_ms", "tokens_per_sec", "ratio_vs_bert",
                 "peak_memory_mb", "error"])


if __name__ == "__main__":
    main()
