"""The cheap suites on an MLM model already in memory: ``probe`` and ``pppl``.

Used both by ``python -m neobert_pt.evaluate`` and by the trainer at checkpoints (``eval.downstream_suites``). Each
returns ``{"metrics": {...}, "settings": {...}}``; every rank must call them (work is split across ranks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from neobert_pt.evaluate.data import embedded_documents
from neobert_pt.evaluate.pppl import pseudo_perplexity
from neobert_pt.evaluate.probe import word_order_probe

DEFAULT_HOLDOUT_FRACTION = 0.05


def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids without special tokens, one list per text (empty texts dropped)."""
    texts = [t for t in texts if t]
    return [enc.ids for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]


def embedded_holdout(eval_fraction: float = DEFAULT_HOLDOUT_FRACTION) -> list[str]:
    """The embedded corpus documents the trainer holds out at ``dataset.eval_fraction`` (same fixed rule)."""
    from neobert_pt.data.sources import holdout_split

    docs = embedded_documents()
    _, eval_idx = holdout_split(len(docs), eval_fraction)
    return [docs[i] for i in eval_idx]


def run_probe(model, tokenizer, *, window: int = 32, max_windows: int | None = 1500, seed: int = 0,
              batch_size: int = 64, baseline: bool = True, progress: bool = True) -> dict[str, Any]:
    docs = encode(tokenizer, embedded_documents())
    metrics = word_order_probe(model, docs, cls_id=tokenizer.cls_token_id, sep_id=tokenizer.sep_token_id,
                               window=window, max_windows=max_windows, seed=seed, batch_size=batch_size,
                               baseline=baseline, progress=progress)
    settings = {"task": "word order (window as written vs shuffled) on the embedded corpus", "window": window,
                "max_windows": max_windows, "seed": seed, "features": "mean+std of last-layer token states",
                "classifier": "StandardScaler + LogisticRegression(C=1)", "split": "80/20 by document"}
    return {"metrics": metrics, "settings": settings}


def run_pppl(model, tokenizer, *, texts: Sequence[str] | None = None, source: str | None = None,
             eval_fraction: float = DEFAULT_HOLDOUT_FRACTION, max_length: int | None = None,
             max_tokens: int | None = None, batch_size: int = 64, progress: bool = True) -> dict[str, Any]:
    """PPPL of ``texts`` (default: the embedded corpus hold-out at ``eval_fraction``)."""
    if texts is None:
        texts = embedded_holdout(eval_fraction)
        source = source or f"embedded corpus hold-out (eval_fraction {eval_fraction})"
    max_length = max_length or min(model.config.max_position_embeddings, 512)
    metrics = pseudo_perplexity(model, encode(tokenizer, texts), cls_id=tokenizer.cls_token_id,
                                sep_id=tokenizer.sep_token_id, mask_id=tokenizer.mask_token_id,
                                max_length=max_length, batch_size=batch_size, max_tokens=max_tokens,
                                progress=progress)
    settings = {"text": source or "given texts", "documents": len(texts), "max_length": max_length,
                "max_tokens": max_tokens}
    return {"metrics": metrics, "settings": settings}


def run_downstream(model, tokenizer, run, *, progress: bool = False) -> dict[str, float]:
    """``trainer.downstream_suites`` on the live (possibly DDP/FSDP2-wrapped) MLM: flat ``downstream/<suite>/<m>``.

    Every rank must call this (forwards are split evenly, sums all-reduced). The budgets are fixed by the config so
    values are comparable across checkpoints and runs; the probe's random-init baseline is left to the CLI.
    """
    tcfg = run.trainer
    fraction = run.dataset.eval_fraction if run.dataset.name == "embedded" and run.dataset.eval_fraction else \
        DEFAULT_HOLDOUT_FRACTION
    out: dict[str, float] = {}
    for suite in tcfg.downstream_suites:
        if suite == "pppl":
            metrics = run_pppl(model, tokenizer, eval_fraction=fraction, max_length=run.dataset.max_seq_length,
                               max_tokens=tcfg.downstream_pppl_tokens, batch_size=tcfg.per_device_eval_batch_size,
                               progress=progress)["metrics"]
            keep = {k: v for k, v in metrics.items() if k in ("pppl", "tokens")}
        else:
            metrics = run_probe(model, tokenizer, max_windows=tcfg.downstream_probe_windows, seed=run.seed,
                                batch_size=tcfg.per_device_eval_batch_size, baseline=False,
                                progress=progress)["metrics"]
            keep = {k: v for k, v in metrics.items() if k in ("accuracy", "train_accuracy")}
        out.update({f"downstream/{suite}/{k}": float(v) for k, v in keep.items()})
    return out
