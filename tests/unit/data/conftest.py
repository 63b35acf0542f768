"""Shared fixtures for the data tests: the embedded tokenizer, a tiny run config, synthetic documents."""

from __future__ import annotations

import numpy as np
import pytest

from neobert_pt.config.schema import RunConfig
from neobert_pt.data.tokenizer import build_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer(RunConfig())


@pytest.fixture
def run(tmp_path) -> RunConfig:
    cfg = RunConfig()
    cfg.dataset.cache_dir = str(tmp_path / "hf_cache")
    cfg.dataset.max_seq_length = 64
    cfg.trainer.per_device_train_batch_size = 4
    cfg.trainer.per_device_eval_batch_size = 4
    cfg.trainer.eval_max_batches = 2
    return cfg


def synthetic_documents(num_docs: int, max_len: int, seed: int = 0) -> list[np.ndarray]:
    """``[CLS] ids [SEP]`` documents of varied length (some empty inside, some far longer than a row)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_len, num_docs)
    return [np.concatenate([[101], rng.integers(1000, 30000, n), [102]]).astype(np.int64) for n in lengths]


@pytest.fixture
def make_documents():
    return synthetic_documents
