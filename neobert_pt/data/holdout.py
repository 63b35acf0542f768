"""The deterministic eval hold-out: which documents of a corpus are kept out of training (no ``datasets`` import)."""

from __future__ import annotations

import numpy as np

# The held-out eval documents do not depend on run.seed, so runs with different seeds evaluate on the same text.
HOLDOUT_SEED = 20240917


def holdout_split(num_documents: int, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) document indices: a fixed pseudo-random ``eval_fraction`` of documents is held out.

    Both index arrays are sorted, so training keeps the corpus order before row shuffling. At least one document
    is held out when ``eval_fraction > 0`` and at least one stays in train.
    """
    if eval_fraction <= 0 or num_documents < 2:
        return np.arange(num_documents), np.arange(0)
    k = min(num_documents - 1, max(1, round(eval_fraction * num_documents)))
    chosen = np.random.default_rng(HOLDOUT_SEED).permutation(num_documents)[:k]
    is_eval = np.zeros(num_documents, dtype=bool)
    is_eval[chosen] = True
    return np.flatnonzero(~is_eval), np.flatnonzero(is_eval)
