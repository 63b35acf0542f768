"""Tiny NeoBERT configs shared by the modeling tests (hidden 32, 2 layers, 4 heads)."""

from collections.abc import Callable

import pytest
import torch

import neobert_pt  # noqa: F401  (registers the Auto classes)
from neobert_pt import NeoBERTConfig

TINY = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)


@pytest.fixture
def make_config() -> Callable[..., NeoBERTConfig]:
    def make(**overrides) -> NeoBERTConfig:
        return NeoBERTConfig(**{**TINY, **overrides})

    return make


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
