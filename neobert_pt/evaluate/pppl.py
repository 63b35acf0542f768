"""Exact pseudo-perplexity (Salazar et al., 2020): every token is masked in turn and scored by the MLM.

    PPPL = exp(-(1/N) Σ_documents Σ_i log p(w_i | w_{\\i}))     over every non-special token i

Documents longer than the context are cut into consecutive windows of ``max_length`` tokens (``[CLS] … [SEP]``
included), so every token is scored exactly once with the window as its context. "Batched" means the copies of one
window, each with a different position masked, form the rows of one forward; only the masked positions go through
the decoder (``masked_logits_only``). The long-document view (as NeoBERT reports it) buckets windows by token length and gives one PPPL per
bucket. Work is split over ranks with :mod:`neobert_pt.evaluate.distributed` and the sums are all-reduced.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from neobert_pt.evaluate.distributed import all_reduce_sum, shard, world

DEFAULT_BUCKETS = (128, 256, 512, 1024, 2048, 4096, 8192)


def windows_of(token_ids: Sequence[int], cls_id: int, sep_id: int, max_length: int) -> list[list[int]]:
    """``[CLS] chunk [SEP]`` windows covering ``token_ids`` (no special tokens in the input) in order."""
    body = max_length - 2
    return [[cls_id, *token_ids[s:s + body], sep_id] for s in range(0, len(token_ids), body) if token_ids[s:s + body]]


@torch.no_grad()
def masked_log_probs(model, window: list[int], positions: list[int], mask_id: int) -> torch.Tensor:
    """log p(true token | window with that one position masked), one row per position, one forward.

    The whole model is called (labels only at the masked slots), never a sub-module: under FSDP2 the root's forward
    is what gathers the shared parameters. With ``masked_logits_only`` the decoder runs on the masked slots only.
    """
    device = next(model.parameters()).device
    ids = torch.tensor(window, device=device)
    pos = torch.tensor(positions, device=device)
    n = len(positions)
    rows = ids.repeat(n, 1)  # (n, L)
    rows[torch.arange(n, device=device), pos] = mask_id
    labels = torch.full_like(rows, -100)
    labels[torch.arange(n, device=device), pos] = ids[pos]
    logits = model(input_ids=rows, labels=labels).logits  # (n, V) masked-only, else (n, L, V)
    if logits.dim() == 3:
        logits = logits[torch.arange(n, device=device), pos]
    return F.log_softmax(logits.float(), dim=-1).gather(1, ids[pos][:, None]).squeeze(1)


def bucket_of(length: int, buckets: Sequence[int]) -> str:
    """Label of the first bucket ``length`` fits in, e.g. ``"129-256"``."""
    low = 1
    for high in buckets:
        if length <= high:
            return f"{low}-{high}"
        low = high + 1
    return f">{buckets[-1]}"


@torch.no_grad()
def pseudo_perplexity(
    model,
    documents: Sequence[Sequence[int]],
    *,
    cls_id: int,
    sep_id: int,
    mask_id: int,
    max_length: int,
    batch_size: int = 64,
    max_tokens: int | None = None,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    progress: bool = True,
) -> dict[str, float]:
    """PPPL over ``documents`` (token ids without special tokens), overall and per window-length bucket.

    ``max_tokens`` caps the scored tokens (documents are taken in order, the last window cut) for cheap checks.
    Returns ``pppl``, ``tokens`` (scored), ``windows``, and ``pppl_len_<bucket>`` / ``tokens_len_<bucket>``.
    """
    windows: list[list[int]] = []
    budget = math.inf if max_tokens is None else max_tokens
    for doc in documents:
        for w in windows_of(list(doc), cls_id, sep_id, max_length):
            if budget <= 0:
                break
            if len(w) - 2 > budget:
                w = [*w[: int(budget) + 1], sep_id]
            windows.append(w)
            budget -= len(w) - 2
    labels = [bucket_of(len(w), buckets) for w in windows]
    names = sorted(set(labels), key=lambda s: int(s.split("-")[0].lstrip(">")))
    # One work item = (window index, a chunk of at most batch_size positions); split over ranks.
    items = [(i, list(range(s, min(s + batch_size, len(w) - 1))))
             for i, w in enumerate(windows) for s in range(1, len(w) - 1, batch_size)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(2 * len(names) + 2, dtype=torch.float64, device=device)  # nll, count (total, per bucket)
    rank, _ = world()
    for (i, positions), weight in tqdm(shard(items), desc="pppl", disable=not progress or rank != 0):
        nll = -masked_log_probs(model, windows[i], positions, mask_id).double().sum() * weight
        b = 2 + 2 * names.index(labels[i])
        sums[0] += nll
        sums[1] += len(positions) * weight
        sums[b] += nll
        sums[b + 1] += len(positions) * weight
    all_reduce_sum(sums)
    model.train(was_training)
    total = sums[1].item()
    out = {"pppl": math.exp(sums[0].item() / total) if total else math.nan, "tokens": total,
           "windows": float(len(windows))}
    for k, name in enumerate(names):
        n = sums[3 + 2 * k].item()
        out[f"pppl_len_{name}"] = math.exp(sums[2 + 2 * k].item() / n) if n else math.nan
        out[f"tokens_len_{name}"] = n
    return out
