"""MLM corruption statistics, special-token safety, padding and keyed determinism."""

from __future__ import annotations

import numpy as np
import torch

from neobert_pt.config.schema import DataCollatorConfig
from neobert_pt.data.collator import MLMCollator

SPECIALS = [0, 100, 101, 102, 103]


def _collator(packing=True, max_len=128, **cfg):
    return MLMCollator(DataCollatorConfig(**cfg), special_ids=SPECIALS, vocab_size=30522, pad_id=0, mask_id=103,
                       seed=7, max_seq_length=max_len, packing=packing)


def _row(n, rng, n_docs=2):
    ids = rng.integers(1000, 30000, n)
    cuts = np.sort(rng.choice(np.arange(1, n), n_docs - 1, replace=False))
    seg = np.zeros(n, dtype=np.int64)
    seg[cuts] = 1
    doc = np.cumsum(seg)
    starts = np.r_[0, cuts]
    ids[starts] = 101
    ids[np.r_[cuts - 1, n - 1]] = 102
    pos = np.arange(n) - starts[doc]
    return {"input_ids": ids.astype(np.int64), "position_ids": pos, "document_ids": doc}


def test_masking_statistics_on_a_large_batch():
    rng = np.random.default_rng(0)
    rows = [_row(128, rng) for _ in range(64)] + [_row(70, rng)]  # last row short: padded
    original = torch.tensor(np.stack([np.pad(r["input_ids"], (0, 128 - len(r["input_ids"]))) for r in rows]))
    batch = _collator(mlm_probability=0.2)(rows, [(0, 0, i) for i in range(len(rows))])
    selected = batch["labels"] != -100
    special = torch.isin(original, torch.tensor(SPECIALS))
    maskable = batch["attention_mask"].bool() & ~special
    assert not (selected & ~maskable).any()  # never specials, never padding
    assert torch.equal(batch["labels"][selected], original[selected])
    assert torch.equal(batch["input_ids"][~selected], original[~selected])
    rate = selected.sum().item() / maskable.sum().item()
    assert abs(rate - 0.2) < 0.015, rate
    n = selected.sum().item()
    masked = (batch["input_ids"][selected] == 103).sum().item() / n
    changed = batch["input_ids"][selected] != original[selected]
    random = (changed & (batch["input_ids"][selected] != 103)).sum().item() / n
    kept = (~changed).sum().item() / n
    assert abs(masked - 0.8) < 0.03 and abs(random - 0.1) < 0.02 and abs(kept - 0.1) < 0.02, (masked, random, kept)
    replaced = batch["input_ids"][selected][changed & (batch["input_ids"][selected] != 103)]
    assert not torch.isin(replaced, torch.tensor(SPECIALS)).any()  # random replacements are ordinary tokens
    # padding of the short row
    assert batch["attention_mask"][-1, 70:].sum() == 0 and (batch["document_ids"][-1, 70:] == -1).all()
    assert (batch["input_ids"][-1, 70:] == 0).all() and (batch["labels"][-1, 70:] == -100).all()
    assert all(v.dtype == torch.long and v.shape == (65, 128) for v in batch.values())


def test_same_key_same_mask_different_key_different_mask():
    rng = np.random.default_rng(1)
    rows = [_row(128, rng) for _ in range(4)]
    collate = _collator()
    a = collate(rows, [(0, 0, i) for i in range(4)])
    b = collate(rows, [(0, 0, i) for i in range(4)])
    c = collate(rows, [(0, 1, i) for i in range(4)])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["labels"], c["labels"])
    # a row's corruption depends only on its own key, not on its batch neighbours
    alone = collate(rows[2:3], [(0, 0, 2)])
    assert torch.equal(alone["input_ids"][0], a["input_ids"][2]) and torch.equal(alone["labels"][0], a["labels"][2])


def test_at_least_one_masked_token_per_batch():
    rng = np.random.default_rng(2)
    rows = [_row(6, rng, n_docs=1) for _ in range(2)]
    collate = _collator(mlm_probability=1e-6, packing=False)
    for k in range(20):
        batch = collate(rows, [(0, k, 0), (0, k, 1)])
        assert (batch["labels"] != -100).sum() >= 1


def test_unpacked_batches_pad_to_a_multiple_capped_at_max_length():
    rng = np.random.default_rng(3)
    collate = _collator(packing=False, max_len=100, pad_to_multiple_of=8)
    assert collate([_row(13, rng, 1), _row(9, rng, 1)], [(0, 0, 0), (0, 0, 1)])["input_ids"].shape == (2, 16)
    assert collate([_row(99, rng, 1)], [(0, 0, 0)])["input_ids"].shape == (1, 100)
    assert _collator(packing=True, max_len=128)([_row(20, rng, 1)], [(0, 0, 0)])["input_ids"].shape == (1, 128)
