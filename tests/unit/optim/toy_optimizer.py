"""A toy optimizer added exactly as docs/optimizers.md ("Adding an optimizer") says: this one file holds its config
class, its builder and its single registration, and nothing else in the repository mentions it.

``tests/unit/optim/test_optimizer_catalog.py`` imports it before ``neobert_pt.config`` (in a fresh interpreter) and
checks that ``optimizer.name: toy-sgd`` with its ``optimizer.toy_config`` sub-block is validated, documented, listed
by ``--help`` and built into a working optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neobert_pt.errors import ConfigError
from neobert_pt.fields import option
from neobert_pt.optim.catalog import register_optimizer
from neobert_pt.optim.registry import BuiltOptimizer, OptimizerContext, torch_param_groups


@dataclass
class ToySGDConfig:
    """Toy SGD: heavy-ball momentum on every parameter group (a test fixture, not a recipe)."""

    momentum: float = option(0.9, "Heavy-ball momentum.")
    nesterov: bool = option(False, "Nesterov momentum instead of heavy ball.")

    def __post_init__(self) -> None:
        if not 0 <= self.momentum < 1:
            raise ConfigError(
                f"optimizer.toy_config.momentum={self.momentum!r} is invalid: must be in [0, 1); "
                "set --optimizer.toy_config.momentum to a valid value."
            )


def build_toy_sgd(ctx: OptimizerContext) -> BuiltOptimizer:
    """torch SGD with the shared param-group policy (weight decay on the matrix groups only)."""
    tc = ctx.config.toy_config
    groups = torch_param_groups(ctx, ctx.config.weight_decay)
    opt = torch.optim.SGD(groups, lr=ctx.peak_lr, momentum=tc.momentum, nesterov=tc.nesterov)
    return BuiltOptimizer(optimizer=opt, log_lines=[f"toy-sgd: momentum={tc.momentum:g} nesterov={tc.nesterov}"])


register_optimizer(
    "toy-sgd",
    summary="Toy SGD with momentum (test fixture of tests/unit/optim/test_optimizer_catalog.py).",
    builder=build_toy_sgd,
    config=ToySGDConfig,
    block="toy_config",
)
