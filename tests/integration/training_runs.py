"""Helpers shared by the integration tests that drive the real Trainer in-process (imported by module name: pytest
puts each test directory on sys.path)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from neobert_pt.train import Trainer
from neobert_pt.train.summary import read_metrics


def run(cfg) -> tuple[Trainer, dict[str, Any]]:
    """Build a Trainer, fit it and always close it; returns (trainer, summary)."""
    trainer = Trainer(cfg)
    try:
        return trainer, trainer.fit()
    finally:
        trainer.close()


def losses(out: Path) -> dict[int, tuple[float, float, float]]:
    """step -> (loss, grad norm, lr) from a run's metrics.jsonl: what bit-exact resume tests compare."""
    return {r["step"]: (r["train/loss"], r["train/grad_norm"], r["train/lr"])
            for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r}
