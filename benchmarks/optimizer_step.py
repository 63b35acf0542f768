"""Milliseconds per ``optimizer.step()`` (and per QK-clip pass) for every optimizer, across model widths.

Same model, same gradients, same process: each optimizer is built through the registry exactly as the trainer
builds it, stepped ``--warmup`` times untimed, then ``--repeats`` times timed; the median is reported with its ratio
to AdamW at the same width. The QK-clip pass (post-update replay of the captured batch + row scaling) is timed
separately on a clip step.

    python benchmarks/optimizer_step.py                         # widths 256..2048 on the default device
    python benchmarks/optimizer_step.py --widths 768 --layers 12 --vocab-size 30522   # the 100M recipe
    python benchmarks/optimizer_step.py --smoke                 # seconds-long structure check (CI)
    python benchmarks/optimizer_step.py --widths 768 --layers 12 --interleave --optimizers adamw adana-fused \
        dana-star-mk4-fused                                     # the CPU bar for the fused DANA update
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import device_name, emit, median_ms, pick_device, synchronize  # noqa: E402
from neobert_pt.modeling import NeoBERTConfig, NeoBERTForMaskedLM  # noqa: E402
from neobert_pt.optim.config import OptimizerConfig  # noqa: E402
from neobert_pt.optim.registry import OptimizerContext, build_optimizer  # noqa: E402

# (label, optimizer.name, config tweaks)
VARIANTS: list[tuple[str, str, dict]] = [
    ("adamw", "adamw", {}),
    ("adamw-decaying-wd", "adamw-decaying-wd", {}),
    ("adana", "adana", {}),
    ("dana-mk4", "dana-mk4", {}),
    ("dana-star", "dana-star", {}),
    ("dana-star-mk4", "dana-star-mk4", {}),
    ("adana-fused", "adana", {"dana_config": {"update_kernel": "compiled"}}),
    ("dana-star-mk4-fused", "dana-star-mk4", {"dana_config": {"update_kernel": "compiled"}}),
    ("muonclip", "muonclip", {"muon_config": {"enable_clipping": True, "clipping_interval": 1}}),
    ("dion2", "dion2", {}),
    ("dion2_qk", "dion2", {"dion2_config": {"enable_clipping": True, "clipping_interval": 1}}),
    # opt-in sgemm orthogonaliser (CPU only; not upstream's bits): compare with muonclip / dion2 for the ratio
    ("muonclip_fastcpu", "muonclip", {"muon_config": {"enable_clipping": False, "fast_cpu_orthogonalization": True}}),
    ("muonclip_noclip", "muonclip", {"muon_config": {"enable_clipping": False}}),
    ("dion2_fastcpu", "dion2", {"dion2_config": {"fast_cpu_orthogonalization": True}}),
    ("dion", "dion", {}),
]
DEFAULT_VARIANTS = [v[0] for v in VARIANTS if not v[0].endswith(("_fastcpu", "_noclip"))]


def build_model(width: int, layers: int, vocab: int, device: torch.device) -> NeoBERTForMaskedLM:
    heads = max(1, width // 64)
    config = NeoBERTConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=4 * width, vocab_size=vocab, max_position_embeddings=512)
    return NeoBERTForMaskedLM(config).to(device)


def optimizer_config(name: str, tweaks: dict) -> OptimizerConfig:
    cfg = OptimizerConfig(name=name, lr=1e-3)
    for block, values in tweaks.items():
        setattr(cfg, block, dataclasses.replace(getattr(cfg, block), **values))
    return cfg


def interleaved_step_ms(variants: list[tuple[str, str, dict]], model, params, grads, args,
                        device: torch.device) -> dict[str, tuple[float, float]]:
    """(median wall ms, median process-CPU ms) per step, the optimizers stepped round-robin, all alive at once.

    On a machine shared with other jobs the load drifts during a run; back-to-back blocks of repeats then compare
    optimizers under different loads, round-robin rounds compare them under the same one. The CPU time (all this
    process's threads) counts the work done rather than the time waited for a core: with one thread
    (``OMP_NUM_THREADS=1``) it is the least load-sensitive measure; with more, it includes OpenMP spin-waiting.
    """
    opts = {label: build_optimizer(OptimizerContext(model=model, config=optimizer_config(name, tweaks),
                                                    max_steps=10_000)).optimizer
            for label, name, tweaks in variants}
    times: dict[str, list[tuple[float, float]]] = {label: [] for label in opts}
    for i in range(args.warmup + args.repeats):
        for label, opt in opts.items():
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            opt.step()
            synchronize(device)
            if i >= args.warmup:
                times[label].append(((time.perf_counter() - start) * 1e3, (time.process_time() - cpu_start) * 1e3))
    return {label: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t)) for label, t in times.items()}


def measure(width: int, args, device: torch.device, names: list[str]) -> list[dict]:
    torch.manual_seed(0)
    model = build_model(width, args.layers, args.vocab_size, device)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    batch = {
        "input_ids": torch.randint(5, args.vocab_size, (args.batch, args.seq_len), device=device),
        "attention_mask": torch.ones(args.batch, args.seq_len, dtype=torch.long, device=device),
    }
    n_params = sum(p.numel() for p in params)
    variants = [(label, name, tweaks) for label, name, tweaks in VARIANTS if label in names]
    interleave = getattr(args, "interleave", False)  # gpu_suite.py calls measure() with its own namespace
    interleaved = interleaved_step_ms(variants, model, params, grads, args, device) if interleave else {}
    rows = []
    for label, name, tweaks in variants:
        built = build_optimizer(OptimizerContext(model=model, config=optimizer_config(name, tweaks), max_steps=10_000))
        opt = built.optimizer

        def step(opt=opt):
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            opt.step()

        step_ms = interleaved[label][0] if interleave else \
            median_ms(step, device=device, repeats=args.repeats, warmup=args.warmup)
        row = {"width": width, "optimizer": label, "params_M": n_params / 1e6, "step_ms": step_ms}
        if interleave:
            row["cpu_ms"] = interleaved[label][1]
        if built.qk_clip is not None:
            clip, times = built.qk_clip, []
            for i in range(args.warmup + args.repeats):
                forward_kwargs = clip.begin_step(i + 1, logging=True)
                assert clip.is_clip_step(i + 1)  # timed: the post-update replay and clip
                with torch.no_grad():
                    clip.record(batch, model(**batch, **forward_kwargs))
                synchronize(device)
                start = time.perf_counter()
                clip.after_step(i + 1)
                synchronize(device)
                if i >= args.warmup:
                    times.append((time.perf_counter() - start) * 1e3)
            row["qk_clip_ms"] = sorted(times)[len(times) // 2]
        rows.append(row)
        del built, opt
    base = next(r["step_ms"] for r in rows if r["optimizer"] == "adamw") if "adamw" in names else None
    base_cpu = next((r.get("cpu_ms") for r in rows if r["optimizer"] == "adamw"), None)
    for r in rows:
        r["ratio_vs_adamw"] = r["step_ms"] / base if base else None
        if base_cpu and "cpu_ms" in r:
            r["cpu_ratio_vs_adamw"] = r["cpu_ms"] / base_cpu
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=30522)
    p.add_argument("--batch", type=int, default=4, help="rows captured for the QK-clip pass")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--optimizers", nargs="+", default=DEFAULT_VARIANTS,
                   help="labels to run; also muonclip_noclip, muonclip_fastcpu, dion2_fastcpu (exact vs fast CPU path); "
                   "the *-fused ones compile the DANA kernel once (tens of seconds on a CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--interleave", action="store_true",
                   help="step the optimizers round-robin (all built at once) instead of one block of repeats each: "
                   "fairer ratios on a machine whose load changes during the run")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repeat: checks the output structure only")
    args = p.parse_args(argv)
    if args.smoke:
        if "--optimizers" not in (argv if argv is not None else sys.argv):  # compiling is not a structure check
            args.optimizers = [o for o in args.optimizers if not o.endswith("-fused")]
        args.widths, args.layers, args.vocab_size, args.repeats, args.warmup = [64], 1, 256, 1, 1
        args.batch, args.seq_len = 2, 16
    device = pick_device(args.device)
    rows = [r for w in args.widths for r in measure(w, args, device, args.optimizers)]
    meta = {"device": device_name(device), "torch": torch.__version__, "layers": args.layers,
            "vocab_size": args.vocab_size, "repeats": args.repeats, "interleave": args.interleave,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    return emit("optimizer_step", meta, rows,
                ["width", "params_M", "optimizer", "step_ms", "ratio_vs_adamw", "qk_clip_ms"]
                + (["cpu_ms", "cpu_ratio_vs_adamw"] if args.interleave else []))


if __name__ == "__main__":
    main()
