"""Metric writers: a tqdm bar, ``metrics.jsonl`` and W&B, fed values that are already reduced across ranks.

Only the main process writes (:func:`build_metric_logger` hands every other rank a :class:`NullLogger`), so callers
never branch on the rank: they reduce on every rank, then call ``log`` everywhere. wandb is imported only when
``wandb.mode`` is ``online``/``offline``.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import uuid
from pathlib import Path
from typing import Any

import torch

METRICS_FILE = "metrics.jsonl"


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak CUDA memory allocated on ``device``, or the process's peak resident set size on CPU."""
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep them visible as "nan"/"inf"
    return value


class NullLogger:
    """What non-writing ranks hold: every call is a no-op."""

    wandb_run_id: str | None = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def advance(self, step: int, postfix: dict[str, float] | None = None) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlWriter:
    """One JSON object per log event in ``OUTPUT_DIR/metrics.jsonl``, always with ``step``; flushed per line."""

    def __init__(self, path: Path, *, resume_step: int | None) -> None:
        self.path = Path(path)
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            self._truncate_after(resume_step)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a")

    def _truncate_after(self, step: int) -> None:
        """A run killed after its last checkpoint logged steps that the resumed run will redo: drop them."""
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError):
                continue  # a line cut by the kill
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class WandbWriter:
    """W&B run; its id is kept in the checkpoint so a resumed run appends to the same run."""

    def __init__(self, cfg: Any, *, output_dir: Path, run_id: str | None, config: dict[str, Any]) -> None:
        import wandb  # lazy: disabled runs never import it

        wandb_dir = Path(cfg.dir) if cfg.dir else Path(output_dir)
        wandb_dir.mkdir(parents=True, exist_ok=True)
        self.run_id = run_id or uuid.uuid4().hex[:8]
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, name=cfg.name or Path(output_dir).name, group=cfg.group,
            tags=list(cfg.tags) or None, mode=cfg.mode, dir=str(wandb_dir), id=self.run_id, resume="allow",
            config=config,
        )

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        self.run.log({k: _jsonable(v) for k, v in metrics.items() if not isinstance(_jsonable(v), str)}, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricLogger:
    """The writing rank's logger: progress bar + JSONL + optional W&B."""

    def __init__(
        self,
        output_dir: Path,
        *,
        max_steps: int,
        start_step: int,
        resume_step: int | None,
        wandb_cfg: Any,
        wandb_run_id: str | None,
        config: dict[str, Any],
        disable_tqdm: bool,
    ) -> None:
        from tqdm.auto import tqdm

        self.jsonl = JsonlWriter(Path(output_dir) / METRICS_FILE, resume_step=resume_step)
        self.wandb = None
        if wandb_cfg.mode in ("online", "offline"):
            self.wandb = WandbWriter(wandb_cfg, output_dir=Path(output_dir), run_id=wandb_run_id, config=config)
        self.wandb_run_id = self.wandb.run_id if self.wandb else wandb_run_id
        self.bar = tqdm(total=max_steps, initial=start_step, disable=disable_tqdm, dynamic_ncols=True, desc="train")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.jsonl.write(step, metrics)
        if self.wandb is not None:
            self.wandb.write(step, metrics)

    def advance(self, step: int, postfix: dict[str, float] | None = None) -> None:
        self.bar.update(step - self.bar.n)
        if postfix:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def message(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
        self.jsonl.close()
        if self.wandb is not None:
            self.wandb.close()


def build_metric_logger(is_writer: bool, **kwargs: Any) -> MetricLogger | NullLogger:
    """A real logger on the writing rank, a :class:`NullLogger` elsewhere."""
    return MetricLogger(**kwargs) if is_writer else NullLogger()
