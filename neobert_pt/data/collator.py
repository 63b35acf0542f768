"""MLM collator: pad rows into a batch and corrupt it (select ``mlm_probability``; 80/10/10 mask/random/keep).

Randomness is keyed, not stateful: every row gets its own ``torch.Generator`` seeded from
``(seed, *key)``, where the loader passes ``key = (stream, epoch, global position of the row)``. So the same
row in the same slot always gets the same mask, whatever happened before (resume is bit-exact with no RNG state
to save), and the mask does not depend on how a global batch is split across ranks (W ranks with batch B mask
exactly like one process with batch W*B).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from neobert_pt.config.schema import DataCollatorConfig
from neobert_pt.data.packing import Row


def keyed_generator(seed: int, key: Sequence[int]) -> torch.Generator:
    """A fresh generator whose stream depends only on ``(seed, *key)`` (SeedSequence mixes the words)."""
    words = np.random.SeedSequence([seed, *key]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed((int(words[0]) << 31) ^ int(words[1]))


class MLMCollator:
    """Pads rows to a common length and applies MLM corruption; returns long tensors.

    Never selects special tokens ([CLS], [SEP], [PAD], [MASK], [UNK], ...) or padding. Random replacements
    are drawn from the non-special vocabulary. If a row ends up with no selected token although it has
    maskable ones, its maskable token with the lowest selection draw is selected (so every batch has a loss,
    and the rule is the same whether a row is collated alone or in a bigger batch).
    """

    def __init__(self, cfg: DataCollatorConfig, *, special_ids: Sequence[int], vocab_size: int, pad_id: int,
                 mask_id: int, seed: int, max_seq_length: int, packing: bool) -> None:
        if cfg.mask_replace_prob + cfg.random_replace_prob > 1.0:
            raise ValueError("datacollator.mask_replace_prob + random_replace_prob must not exceed 1")
        self.mlm_probability = cfg.mlm_probability
        self.mask_replace_prob = cfg.mask_replace_prob
        self.random_replace_prob = cfg.random_replace_prob
        self.pad_to_multiple_of = cfg.pad_to_multiple_of
        self.special_ids = torch.tensor(sorted(set(special_ids)), dtype=torch.long)
        allowed = torch.ones(vocab_size, dtype=torch.bool)
        allowed[self.special_ids[self.special_ids < vocab_size]] = False
        self.random_pool = allowed.nonzero().flatten()  # ids a "random" replacement may take
        self.pad_id = pad_id
        self.mask_id = mask_id
        self.seed = seed
        self.max_seq_length = max_seq_length
        self.packing = packing

    def batch_length(self, longest: int) -> int:
        """Packed batches always have max_seq_length columns; unpacked ones pad to a multiple, capped at it."""
        if self.packing:
            return self.max_seq_length
        m = self.pad_to_multiple_of or 1
        return min(-(-longest // m) * m, max(self.max_seq_length, longest))

    def __call__(self, rows: Sequence[Row], keys: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        length = self.batch_length(max(len(r["input_ids"]) for r in rows))
        b = len(rows)
        input_ids = torch.full((b, length), self.pad_id, dtype=torch.long)
        position_ids = torch.zeros((b, length), dtype=torch.long)
        document_ids = torch.full((b, length), -1, dtype=torch.long)
        selection_draw = torch.ones((b, length))  # 1.0 never passes "< mlm_probability"
        action_draw = torch.ones((b, length))
        random_ids = torch.zeros((b, length), dtype=torch.long)
        for i, (row, key) in enumerate(zip(rows, keys, strict=True)):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.from_numpy(row["input_ids"])
            position_ids[i, :n] = torch.from_numpy(row["position_ids"])
            document_ids[i, :n] = torch.from_numpy(row["document_ids"])
            gen = keyed_generator(self.seed, key)
            selection_draw[i, :n] = torch.rand(n, generator=gen)
            action_draw[i, :n] = torch.rand(n, generator=gen)
            random_ids[i, :n] = self.random_pool[torch.randint(len(self.random_pool), (n,), generator=gen)]
        attention_mask = (document_ids >= 0).long()
        maskable = attention_mask.bool() & ~torch.isin(input_ids, self.special_ids)
        selection_draw = selection_draw.masked_fill(~maskable, 2.0)
        selected = selection_draw < self.mlm_probability
        # A row with maskable tokens but no selection gets its lowest draw selected (per row, so the rule does not
        # depend on how a global batch is split across ranks).
        empty = ~selected.any(dim=1) & maskable.any(dim=1)
        if empty.any():
            rows = empty.nonzero().flatten()
            selected[rows, selection_draw[rows].argmin(dim=1)] = True
        labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))
        to_mask = selected & (action_draw < self.mask_replace_prob)
        to_random = selected & ~to_mask & (action_draw < self.mask_replace_prob + self.random_replace_prob)
        corrupted = torch.where(to_mask, torch.full_like(input_ids, self.mask_id), input_ids)
        corrupted = torch.where(to_random, random_ids, corrupted)
        return {
            "input_ids": corrupted,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "document_ids": document_ids,
            "labels": labels,
        }
