"""Resume = the checkpoint's *state* under the *current* config.

The checkpoint supplies what training produced: weights, optimizer moments, the step and token counters, every
rank's data position and RNG. The current config supplies every choice: optimizer hyperparameters (lr, betas, eps,
weight decay, sub-block settings) and the LR schedule (``scheduler.*``, ``trainer.max_steps``). So
``--trainer.resume_from_checkpoint latest --optimizer.lr 1e-5`` trains at 1e-5 — the fix the non-finite abort
recommends — and every changed setting is logged once ("optimizer.lr 0.001 → 1e-05").

Mechanics: ``optimizer.load_state_dict`` overwrites each param group's hyperparameters with the saved ones, so the
freshly built groups are snapshotted first and written back after the load; only keys in
:data:`GROUP_STATE_KEYS` (counters an optimizer keeps in its param groups) keep the checkpoint's value. The LR of
every group is then set to the current schedule at the resumed step.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch

from neobert_pt.config import config_to_dict
from neobert_pt.config.yamlio import parse_yaml
from neobert_pt.train.checkpoint import Checkpointer, CheckpointError, Restored

logger = logging.getLogger(__name__)

# Param-group entries that are optimizer *state* (progress counters), restored from the checkpoint. Every other
# entry is a hyperparameter taken from the current config. An optimizer that keeps another counter in its param
# groups must add its key here.
GROUP_STATE_KEYS = frozenset({"params", "step"})
# Config keys that say where/how to run, not what to train: never reported as changes.
_IGNORED_KEYS = ("trainer.resume_from_checkpoint", "trainer.overwrite_output_dir", "trainer.output_dir")
_REPORTED_SECTIONS = ("optimizer.", "scheduler.", "trainer.")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def config_changes(saved_yaml: str | None, run: Any) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, current value) for every setting that differs from the checkpoint's config."""
    if not saved_yaml:
        return []
    saved = _flatten(parse_yaml(saved_yaml) or {})
    current = _flatten(config_to_dict(run))
    return [(k, saved.get(k), v) for k, v in current.items()
            if k in saved and saved[k] != v and k not in _IGNORED_KEYS]


def _shape_mismatches(path: Path, model: torch.nn.Module) -> list[str]:
    """Tensors whose shape in the checkpoint's ``model.safetensors`` differs from the model's (non-sharded only)."""
    weights = path / "model.safetensors"
    if not weights.is_file():
        return []
    from safetensors import safe_open

    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    out = []
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            shape = tuple(f.get_slice(key).get_shape())
            if key in mine and mine[key] != shape:
                out.append(f"{key} {list(shape)} in the checkpoint vs {list(mine[key])} now")
    return out


def restore(checkpointer: Checkpointer, path: Path, *, run: Any, model: torch.nn.Module, optimizer: Any,
            scheduler: Any) -> Restored:
    """Load ``path`` into ``model`` / ``optimizer`` (all ranks), keep the current hyperparameters and put the
    schedule at the resumed step. Returns what the trainer restores itself (counters, data position)."""
    config_file = path / "config.yaml"
    saved_yaml = config_file.read_text(encoding="utf-8") if config_file.is_file() else None
    try:
        changes = config_changes(saved_yaml, run)
    except Exception as e:  # noqa: BLE001 - a broken config.yaml is reported by the file check below anyway
        raise CheckpointError(f"cannot read {config_file}: {type(e).__name__}: {e}") from None
    renamed = next(((old, new) for key, old, new in changes if key == "optimizer.name"), None)
    if renamed:
        raise CheckpointError(
            f"cannot resume from {path}: optimizer.name was {renamed[0]!r} in the checkpoint and is {renamed[1]!r} "
            "now; an optimizer cannot continue from another one's state. Resume with optimizer.name "
            f"{renamed[0]!r}, or start a new run"
        )
    mismatched = _shape_mismatches(path, model)
    if mismatched:
        fields = [f"{k} {old} → {new}" for k, old, new in changes if k.startswith("model.")]
        raise CheckpointError(
            f"cannot resume from {path}: the model differs from the checkpoint's "
            f"({', '.join(fields) if fields else mismatched[0]}"
            f"{'' if fields else f'; {len(mismatched)} tensors differ'}); resume with the checkpoint's model "
            "settings or start a new run"
        )
    fresh = [{k: copy.deepcopy(v) for k, v in g.items() if k not in GROUP_STATE_KEYS} for g in optimizer.param_groups]
    restored = checkpointer.load(path)
    if len(optimizer.param_groups) != len(fresh):
        raise CheckpointError(f"{path}: the optimizer has {len(fresh)} parameter groups now and "
                              f"{len(optimizer.param_groups)} in the checkpoint; resume with the same optimizer")
    for group, hyper in zip(optimizer.param_groups, fresh, strict=True):
        group.update(hyper)
    for key, old, new in changes:
        if key.startswith(_REPORTED_SECTIONS):
            logger.info("resume: %s %s → %s (the current config wins; the checkpoint supplies the state)",
                        key, old, new)
    set_schedule_step(scheduler, optimizer, restored.step)
    return restored


def set_schedule_step(scheduler: Any, optimizer: Any, step: int) -> None:
    """Put a ``LambdaLR`` at ``step`` updates done under the current schedule (a changed ``max_steps`` or peak LR
    re-shapes the curve from here on) and set every group's LR to the schedule's value."""
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    state = scheduler.state_dict()
    state.update(last_epoch=step, _step_count=step + 1, _last_lr=lrs)
    scheduler.load_state_dict(state)
    logger.info("resumed at step %d with lr %.4g", step, lrs[0])
