"""Optimizers and the registry that builds them from ``optimizer.*`` config."""

from neobert_pt.optim.config import DanaConfig, Dion2Config, DionConfig, MuonConfig, OptimizerConfig
from neobert_pt.optim.dana import AdamWDecayingWD, ADana, DanaStar
from neobert_pt.optim.dion import Dion, DionMixedPrecisionConfig
from neobert_pt.optim.dion2 import Dion2
from neobert_pt.optim.lr_rule import resolve_lr, suggest_peak_lr
from neobert_pt.optim.muon import Muon
from neobert_pt.optim.orthogonalize import orthogonalize
from neobert_pt.optim.registry import (
    BuiltOptimizer,
    OptimizerContext,
    available_optimizers,
    build_optimizer,
    register,
)

__all__ = [
    "ADana",
    "AdamWDecayingWD",
    "BuiltOptimizer",
    "DanaConfig",
    "DanaStar",
    "Dion",
    "Dion2",
    "Dion2Config",
    "DionConfig",
    "DionMixedPrecisionConfig",
    "Muon",
    "MuonConfig",
    "OptimizerConfig",
    "OptimizerContext",
    "available_optimizers",
    "build_optimizer",
    "orthogonalize",
    "register",
    "resolve_lr",
    "suggest_peak_lr",
]
