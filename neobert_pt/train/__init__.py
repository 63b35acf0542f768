"""The Accelerate training loop and its components (checkpoints, metrics, schedules, distributed wrapping)."""

from neobert_pt.train.trainer import NonFiniteLossError, Trainer

__all__ = ["NonFiniteLossError", "Trainer"]
