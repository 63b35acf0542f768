"""Train several optimizer variants one after the other inside ONE process group, then dump what the tests compare.

Launched by the distributed tests as ``accelerate launch --config_file <cpu config> train_variants.py OUT NAMES``
(2 gloo ranks) and as a plain ``python train_variants.py`` (the single-process reference). Each variant is built
exactly as ``scripts/pretraining/pretrain.py`` builds a run (``load_config`` of the same dotted overrides, then
``Trainer(cfg).fit()``); the only difference is that the ranks keep one process group across variants, because a
process start costs far more than a tiny run. Every variant gets a fresh ``Accelerator`` from
``distributed.make_accelerator`` (what the trainer would create itself) and its own output directory; between
variants accelerate's singleton ``AcceleratorState`` is cleared (the process group, held by ``PartialState``, stays),
otherwise the second Accelerator would inherit the first one's resolved state (e.g. its mixed precision).

Per variant and rank it writes ``OUT/<name>/dump_rank<r>.pt``:
``local`` (this rank's parameters: full tensors under DDP, its own shard under FSDP2), ``kinds`` (per parameter:
its type and, for a DTensor, placements, mesh size, local and global rows), and on rank 0 ``full`` (the gathered
full state dict).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Tiny run shared by every launch: 2 blocks (two FSDP2 units), seq 32, 6 optimizer steps, checkpoints at 3 and 6,
# eval only at the end. 2 micro-batches per step (no_sync on the first) of 4 rows in all: per-device batch 2 on
# 2 ranks, 4 in the single-process reference, so a step sees 8 rows either way.
TINY = [
    "--model.hidden_size", "32", "--model.num_hidden_layers", "2", "--model.num_attention_heads", "2",
    "--model.intermediate_size", "64", "--dataset.max_seq_length", "32", "--dataset.max_documents", "40",
    "--trainer.max_steps", "6", "--trainer.gradient_accumulation_steps", "2", "--trainer.logging_steps", "1", "--trainer.eval_steps", "null",
    "--trainer.eval_max_batches", "1", "--trainer.save_steps", "3", "--trainer.save_total_limit", "null",
    "--scheduler.warmup_steps", "2", "--trainer.disable_tqdm", "true", "--seed", "3",
    "--trainer.overwrite_output_dir", "true", "--wandb.mode", "disabled",
]
MAX_STEPS = 6
SAVE_STEP = 3
GLOBAL_ROWS = 4

# QK-clip "really clips": a threshold far below the tiny model's max attention logit, checked every step.
CLIP_THRESHOLD = 0.05
_CLIP = ["clipping_interval", "1", "clipping_threshold", str(CLIP_THRESHOLD), "clipping_warmup_steps", "0"]


def _sub(block: str, pairs: list[str]) -> list[str]:
    out = []
    for key, value in zip(pairs[::2], pairs[1::2], strict=True):
        out += [f"--optimizer.{block}.{key}", value]
    return out


VARIANTS: dict[str, list[str]] = {
    "adamw": ["--optimizer.name", "adamw", "--optimizer.lr", "1e-3"],
    "adana": ["--optimizer.name", "adana", "--optimizer.lr", "1e-3"],
    "dana-mk4": ["--optimizer.name", "dana-mk4", "--optimizer.lr", "1e-3"],
    "dana-star": ["--optimizer.name", "dana-star", "--optimizer.lr", "1e-3"],
    "dana-star-mk4": ["--optimizer.name", "dana-star-mk4", "--optimizer.lr", "1e-3"],
    "adamw-decaying-wd": ["--optimizer.name", "adamw-decaying-wd", "--optimizer.lr", "1e-3"],
    "muonclip": ["--optimizer.name", "muonclip", "--optimizer.lr", "1e-2",
                 *_sub("muon_config", ["enable_clipping", "true", *_CLIP])],
    # 'global' selection picks the same rows as one process does, so FSDP2 can be compared with it; the default
    # 'local' scope selects per shard (a different algorithm by design) and is only checked to train.
    "dion2": ["--optimizer.name", "dion2", "--optimizer.lr", "1e-2",
              *_sub("dion2_config", ["enable_clipping", "false", "selection_scope", "global"])],
    "dion2-qk": ["--optimizer.name", "dion2", "--optimizer.lr", "1e-2",
                 *_sub("dion2_config", ["enable_clipping", "true", "selection_scope", "global", *_CLIP])],
    "dion2-local": ["--optimizer.name", "dion2", "--optimizer.lr", "1e-2",
                    *_sub("dion2_config", ["enable_clipping", "false", "selection_scope", "local"])],
    # Training phases (docs/phases.md): batch-size warmup, masking 0.3 -> 0.15, then 64-token rows with a larger RoPE
    # base; per-device rows come from the run, so ranks split each phase's global batch like one process.
    "adamw-phases": ["--optimizer.name", "adamw", "--optimizer.lr", "1e-3", "--phases",
                     "[{steps: 3, mlm_probability: 0.3, batch_warmup_steps: 2}, "
                     "{max_seq_length: 64, rope_theta: 80000, mlm_probability: 0.15}]"],
    # Dion at rank_fraction 0.25: every block matrix of the tiny model is compressed on a replicate axis. On HSDP
    # "dion" averages only P and R over the replicate axis; "dion-fullsync" lets FSDP average full gradients. No
    # gradient clipping: with compressed sync the per-replica gradients differ, so the clip norm is a replica RMS
    # (distributed.clip_grad_norm), not the norm of the mean gradient that full sync clips by.
    "dion": ["--optimizer.name", "dion", "--optimizer.lr", "1e-3", "--trainer.max_grad_norm", "null",
             *_sub("dion_config", ["rank_fraction", "0.25", "matrix_lr", "1e-2"])],
    "dion-fullsync": ["--optimizer.name", "dion", "--optimizer.lr", "1e-3", "--trainer.max_grad_norm", "null",
                      *_sub("dion_config", ["rank_fraction", "0.25", "matrix_lr", "1e-2",
                                            "replicate_mesh_grad_sync", "false"])],
}
CLIPPING = ("muonclip", "dion2-qk")


def run_args(name: str, output_dir: Path, per_device_rows: int, extra: list[str] = ()) -> list[str]:
    """The dotted overrides of one variant: the same list is valid for ``pretrain.py``."""
    return [*TINY, *VARIANTS[name], "--trainer.per_device_train_batch_size", str(per_device_rows),
            "--trainer.output_dir", str(output_dir), *extra]


def _dump(trainer, out: Path) -> None:
    """Write this rank's parameters and their kinds; gather the full state dict (a collective under FSDP2)."""
    import torch
    from torch.distributed.tensor import DTensor

    from neobert_pt.train import distributed

    acc = trainer.accelerator
    local, kinds = {}, {}
    for name, p in trainer.model.named_parameters():
        if isinstance(p, DTensor):
            local[name] = p.to_local().detach().clone()
            kinds[name] = {"type": "DTensor", "placements": [repr(x) for x in p.placements],
                           "mesh_size": p.device_mesh.size(), "local_rows": p.to_local().shape[0],
                           "rows": p.shape[0]}
        else:
            local[name] = p.detach().clone()
            kinds[name] = {"type": type(p.data).__name__}
    full = distributed.full_state_dict(acc, trainer.model)
    dump = {"local": local, "kinds": kinds, "world_size": acc.num_processes, "mode": distributed.mode(acc)}
    if acc.is_main_process:
        dump["full"] = {k: v.detach().clone() for k, v in full.items()}
    torch.save(dump, out / f"dump_rank{acc.process_index}.pt")
    acc.wait_for_everyone()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("names", help="comma-separated variant names")
    parser.add_argument("--per-device-rows", type=int, required=True)
    args = parser.parse_args(argv)

    from accelerate.state import AcceleratorState, GradientState

    from neobert_pt.config import load_config
    from neobert_pt.train import Trainer, distributed

    acc = None
    for name in args.names.split(","):
        if acc is not None:
            AcceleratorState._reset_state()
            GradientState._reset_state()
        cfg = load_config(None, run_args(name, args.out / name, args.per_device_rows))
        acc = distributed.make_accelerator(cfg.trainer.mixed_precision)
        trainer = Trainer(cfg, accelerator=acc)
        try:
            trainer.fit()
            _dump(trainer, args.out / name)
        finally:
            trainer.close()
        print(f"VARIANT_DONE {name} rank {acc.process_index}", flush=True)
    if acc is not None:
        acc.end_training()


if __name__ == "__main__":
    sys.exit(main())
