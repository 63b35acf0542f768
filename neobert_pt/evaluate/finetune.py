"""The fine-tuning loop shared by GLUE and NER: AdamW, linear warmup then linear decay, padded mini-batches.

One call fine-tunes one (task, learning rate, seed) run on one device; independent runs are what is spread over
processes under ``accelerate launch`` (:func:`assign_runs`), which keeps every run single-device and reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from neobert_pt.evaluate.distributed import gather_objects, world
from neobert_pt.evaluate.errors import EvalError


@dataclass
class Recipe:
    """Fine-tuning hyper-parameters (a YAML file; every value is printed into the results)."""

    learning_rates: list[float]
    seeds: list[int]
    batch_size: int = 32
    epochs: float = 3.0
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_length: int = 128
    eval_batch_size: int = 128
    max_grad_norm: float = 1.0
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    tasks: list[str] | None = None
    dataset: str | None = None


def load_recipe(path: Path, default: Path) -> tuple[Recipe, dict[str, Any]]:
    """(recipe, the raw mapping) from ``path`` or ``default``; unknown keys are one clear error line."""
    import yaml

    path = Path(path or default)
    if not path.is_file():
        raise EvalError(f"recipe file {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in fields(Recipe)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise EvalError(f"{path}: unknown recipe key(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    missing = [k for k in ("learning_rates", "seeds") if k not in raw]
    if missing:
        raise EvalError(f"{path}: missing recipe key(s) {', '.join(missing)}")
    return Recipe(**raw), raw


def pad_batch(rows: list[dict[str, Any]], pad_id: int, label_pad: int | None) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` (and per-token ``labels`` when ``label_pad`` is given) to the longest row."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, : len(r["input_ids"])] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if "labels" in rows[0]:
        if label_pad is None:
            batch["labels"] = torch.tensor([r["labels"] for r in rows])
        else:
            labels = torch.full((len(rows), width), label_pad, dtype=torch.long)
            for i, r in enumerate(rows):
                labels[i, : len(r["labels"])] = torch.tensor(r["labels"])
            batch["labels"] = labels
    return batch


def train(model, rows: list[dict[str, Any]], recipe: Recipe, *, lr: float, seed: int, pad_id: int,
          label_pad: int | None, device: torch.device, progress: bool = False, desc: str = "fine-tune") -> float:
    """Fine-tune ``model`` in place; returns the last logged training loss."""
    from transformers import get_linear_schedule_with_warmup

    model.to(device).train()
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(rows) / recipe.batch_size)
    total = max(1, math.ceil(steps_per_epoch * recipe.epochs))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embeddings" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embeddings" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                   {"params": other, "weight_decay": 0.0}], lr=lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(recipe.warmup_ratio * total), total)
    step, loss_value = 0, math.nan
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
    while step < total:
        for idx in torch.randperm(len(rows), generator=generator).split(recipe.batch_size):
            batch = pad_batch([rows[i] for i in idx.tolist()], pad_id, label_pad)
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_value = loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            if step >= total:
                break
    bar.close()
    model.eval()
    return loss_value


@torch.no_grad()
def predict(model, rows: list[dict[str, Any]], *, batch_size: int, pad_id: int, device: torch.device) -> list:
    """Logits per row (CPU tensors), in order: (num_labels,) for sequences, (T_row, num_labels) for tokens."""
    model.eval()
    out = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        batch = pad_batch([{"input_ids": r["input_ids"]} for r in chunk], pad_id, None)
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
        out += [logits[i] if logits.dim() == 2 else logits[i, : len(r["input_ids"])] for i, r in enumerate(chunk)]
    return out


def assign_runs(runs: list[Any], work: Callable[[Any], dict[str, Any]]) -> list[dict[str, Any]]:
    """Run ``work`` on this rank's share of ``runs`` (round-robin) and return every run's result, in order."""
    rank, size = world()
    mine = {i: work(run) for i, run in enumerate(runs) if i % size == rank}
    merged: dict[int, dict[str, Any]] = {}
    for part in gather_objects(mine):
        merged.update(part)
    return [merged[i] for i in range(len(runs))]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(values) > 1 else 0.0)
