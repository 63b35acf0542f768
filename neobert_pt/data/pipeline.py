"""``build_data``: config → documents → tokens → packed rows → MLM batches (train loader + fixed eval batches).

Source kinds (see :mod:`neobert_pt.data.loader` for how each becomes batches):

- ``tokenized``: shards written by ``python -m neobert_pt.data prepare``, memory-mapped (no ``datasets`` import);
- map-style: the embedded corpus, local files or a Hub dataset, tokenized with ``datasets.map`` (cached);
- ``streaming: true``: a ``datasets`` stream, tokenized lazily, each rank only its own share;
- ``mixture``: several map-style or tokenized sources with weights.

``datasets`` is imported only by the kinds that read text (lazily, inside :mod:`neobert_pt.data.sources`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerFast

from neobert_pt.config.schema import RunConfig
from neobert_pt.data.collator import MLMCollator
from neobert_pt.data.errors import DataError
from neobert_pt.data.holdout import holdout_split
from neobert_pt.data.loader import (
    Batch,
    BatchPlan,
    MapBatches,
    MixtureBatches,
    StreamBatches,
    TrainLoader,
    eval_plan,
    iter_eval_batches,
)
from neobert_pt.data.packing import PackedRows, RowList, pack_stream


@dataclass
class DataBundle:
    """What the trainer needs from the data side. Counts are None where a stream makes them unknown."""

    train: TrainLoader
    tokens_per_row: int
    num_train_rows: int | None
    num_train_tokens: int | None
    _eval_rows: Callable[[], Any] = field(repr=False)
    _eval_batches: Callable[[Any], Iterator[Batch]] = field(repr=False)

    def eval_batches(self) -> Iterator[Batch]:
        """The same eval batches (same rows, same masks) on every call; equally many on every rank."""
        rows = self._eval_rows()
        if rows is not None:
            yield from self._eval_batches(rows)

    @property
    def num_eval_rows(self) -> int:
        rows = self._eval_rows()
        return 0 if rows is None else len(rows)

    def describe(self) -> str:
        """One line for the startup log."""
        rows = "streamed" if self.num_train_rows is None else f"{self.num_train_rows:,} rows"
        tokens = "" if self.num_train_tokens is None else f" ({self.num_train_tokens:,} tokens)"
        mix = f" from {', '.join(self.train.labels)}" if self.train.labels else ""
        return (f"data: {self.train.kind} train {rows}{tokens}{mix} of {self.tokens_per_row} tokens; eval "
                f"{self.num_eval_rows:,} rows; {self.train.num_workers} loader worker(s)")


class ConcatRows:
    """Several row collections read as one (the eval rows of a mixture)."""

    def __init__(self, parts: list[PackedRows]) -> None:
        self.parts = parts
        self.ends = [0]
        for p in parts:
            self.ends.append(self.ends[-1] + len(p))

    def __len__(self) -> int:
        return self.ends[-1]

    def __getitem__(self, index: int) -> dict:
        for k, part in enumerate(self.parts):
            if index < self.ends[k + 1]:
                return part[index - self.ends[k]]
        raise IndexError(index)


def build_collator(run: RunConfig, tokenizer: PreTrainedTokenizerFast) -> MLMCollator:
    return MLMCollator(
        run.datacollator, special_ids=tokenizer.all_special_ids, vocab_size=len(tokenizer),
        pad_id=tokenizer.pad_token_id, mask_id=tokenizer.mask_token_id, seed=run.seed,
        max_seq_length=run.dataset.max_seq_length, packing=run.dataset.packing,
    )


def build_data(run: RunConfig, tokenizer: PreTrainedTokenizerFast, *, rank: int, world_size: int,
               pin_memory: bool = False) -> DataBundle:
    """Train loader and eval batches for this rank (see :mod:`neobert_pt.data.loader` for the batch rule).

    Under several processes, call it on the main process first (``accelerator.main_process_first()``) so the
    others find the tokenized data in the cache.
    """
    collator = build_collator(run, tokenizer)
    tr, cfg = run.trainer, run.dataset
    plan = BatchPlan(batch_size=tr.per_device_train_batch_size, rank=rank, world_size=world_size,
                     rows_per_step=tr.per_device_train_batch_size * tr.gradient_accumulation_steps * world_size)
    loader_args = dict(num_workers=tr.dataloader_num_workers, prefetch_factor=tr.dataloader_prefetch_factor,
                       pin_memory=pin_memory)

    def eval_of(rows: Any) -> Iterator[Batch]:
        return iter_eval_batches(rows, collator, batch_size=tr.per_device_eval_batch_size,
                                 max_batches=tr.eval_max_batches, rank=rank, world_size=world_size)

    if cfg.mixture:
        parts = [_source_rows(_source_run(run, entry), tokenizer) for entry in cfg.mixture]
        sources = [(str(e.get("label") or e["name"]), train_rows, float(e["weight"]))
                   for e, (train_rows, _) in zip(cfg.mixture, parts, strict=True)]
        evals = [ev for _, ev in parts if ev is not None]
        eval_rows = ConcatRows(evals) if evals else None
        train = TrainLoader(MixtureBatches(sources, collator, plan, seed=run.seed), **loader_args)
        return DataBundle(train, cfg.max_seq_length, sum(len(r) for _, r, _ in sources),
                          sum(r.num_tokens for _, r, _ in sources), lambda: eval_rows, eval_of)
    if cfg.streaming:
        batches, eval_rows = _streaming(run, tokenizer, collator, plan)
        return DataBundle(TrainLoader(batches, **loader_args), cfg.max_seq_length, None, None, eval_rows, eval_of)
    train_rows, eval_rows = _source_rows(run, tokenizer)
    train = TrainLoader(MapBatches(train_rows, collator, plan, seed=run.seed), **loader_args)
    return DataBundle(train, cfg.max_seq_length, len(train_rows), train_rows.num_tokens, lambda: eval_rows, eval_of)


def _source_run(run: RunConfig, entry: dict[str, Any]) -> RunConfig:
    """A copy of ``run`` whose dataset is one mixture source."""
    src = copy.deepcopy(run)
    ds = src.dataset
    ds.mixture = []
    ds.name, ds.data_files = entry["name"], entry.get("data_files")
    ds.config_name = entry.get("config_name")
    ds.split = entry.get("split", "train")
    ds.text_column = entry.get("text_column", "text")
    ds.eval_split = None
    return src


def _source_rows(run: RunConfig, tokenizer: PreTrainedTokenizerFast) -> tuple[PackedRows, PackedRows | None]:
    """Packed train and eval rows of one map-style or tokenized source.

    Eval is ``eval_split`` or a fixed held-out fraction of the documents.
    """
    cfg = run.dataset
    if cfg.name == "tokenized":
        from neobert_pt.data.tokenized import open_tokenized
        from neobert_pt.data.tokenizer import tokenizer_fingerprint

        if cfg.eval_split is not None:
            raise DataError("dataset.eval_split: tokenized shards hold one split; set dataset.eval_split null to "
                            "hold out dataset.eval_fraction of the documents.")
        corpus = open_tokenized(cfg.data_files[0], fingerprint=tokenizer_fingerprint(tokenizer))
        values, starts, lengths = corpus.tokens, corpus.doc_starts, corpus.doc_lengths
        if cfg.max_documents is not None:
            starts, lengths = starts[:cfg.max_documents], lengths[:cfg.max_documents]
    else:
        from neobert_pt.data.sources import flat_tokens, load_documents, tokenize_documents

        tokenized = tokenize_documents(load_documents(run, cfg.split), tokenizer, cfg.num_proc)
        values, starts, lengths = flat_tokens(tokenized)
        if cfg.eval_split is not None:
            train_rows = PackedRows(values, starts, lengths, cfg.max_seq_length, cfg.packing)
            eval_tokens = flat_tokens(tokenize_documents(load_documents(run, cfg.eval_split), tokenizer, cfg.num_proc))
            return train_rows, PackedRows(*eval_tokens, cfg.max_seq_length, cfg.packing)
    train_idx, eval_idx = holdout_split(len(lengths), cfg.eval_fraction)
    train_rows = PackedRows(values, starts[train_idx], lengths[train_idx], cfg.max_seq_length, cfg.packing)
    eval_rows = PackedRows(values, starts[eval_idx], lengths[eval_idx], cfg.max_seq_length, cfg.packing) \
        if len(eval_idx) else None
    return train_rows, eval_rows


def _streaming(run: RunConfig, tokenizer: PreTrainedTokenizerFast, collator: MLMCollator, plan: BatchPlan
               ) -> tuple[StreamBatches, Callable[[], RowList | None]]:
    """Streams: eval is the head of ``eval_split``, or the first documents of the train stream, held out from it.

    The held-out head is ``eval_max_batches * per_device_eval_batch_size`` documents (independent of the world
    size, so every world size trains on the same stream). Eval rows are materialized once, on first use.
    """
    import numpy as np

    from neobert_pt.data.sources import iter_token_documents, load_documents
    from neobert_pt.data.tokenizer import encode_texts

    cfg, tr = run.dataset, run.trainer
    if cfg.name == "tokenized":
        raise DataError("dataset.streaming: tokenized shards are memory-mapped, not streamed; set "
                        "dataset.streaming false.")
    stream = load_documents(run, cfg.split, streaming=True)
    head = tr.eval_max_batches * tr.per_device_eval_batch_size
    eval_docs = None
    holdout = None
    if cfg.eval_split is not None:
        eval_docs = load_documents(run, cfg.eval_split, streaming=True).take(head)
    elif cfg.eval_fraction > 0:
        eval_docs, stream = stream.take(head), stream.skip(head)
        holdout = (f"the first trainer.eval_max_batches x per_device_eval_batch_size = {head} documents, because "
                   "dataset.eval_fraction > 0")
    shuffled = stream.shuffle(seed=run.seed, buffer_size=cfg.shuffle_buffer_size)

    def open_epoch(epoch: int) -> Iterator[str]:
        shuffled.set_epoch(epoch)  # shuffle seed = run.seed + epoch: a re-opened epoch replays the same order
        return (example["text"] for example in shuffled)

    def encode(texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int64) for ids in encode_texts(tokenizer, texts)]

    batches = StreamBatches(open_epoch, encode, collator, plan, seed=run.seed, holdout=holdout)
    cache: list[RowList | None] = []

    def eval_rows() -> RowList | None:
        if not cache:
            cache.append(None if eval_docs is None else RowList(list(
                pack_stream(iter_token_documents(eval_docs, tokenizer), cfg.max_seq_length, cfg.packing))))
        return cache[0]

    return batches, eval_rows


__all__ = ["DataBundle", "build_collator", "build_data", "eval_plan"]
