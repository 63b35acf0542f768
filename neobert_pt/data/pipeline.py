"""``build_data``: config → documents → tokens → packed rows → MLM batches (train loader + fixed eval batches)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import datasets
from transformers import PreTrainedTokenizerFast

from neobert_pt.config.schema import RunConfig
from neobert_pt.data.collator import MLMCollator
from neobert_pt.data.loader import Batch, StreamingTrainLoader, TrainLoader, eval_plan, iter_eval_batches
from neobert_pt.data.packing import PackedRows, Row, RowList, pack_stream
from neobert_pt.data.sources import (
    flat_tokens,
    holdout_split,
    iter_token_documents,
    load_documents,
    tokenize_documents,
)


@dataclass
class DataBundle:
    """What the trainer needs from the data side. Counts are None where a stream makes them unknown."""

    train: TrainLoader | StreamingTrainLoader
    tokens_per_row: int
    num_train_rows: int | None
    num_train_tokens: int | None
    _eval_rows: Callable[[], PackedRows | RowList | None] = field(repr=False)
    _eval_batches: Callable[[PackedRows | RowList], Iterator[Batch]] = field(repr=False)

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
        return f"data: train {rows}{tokens} of {self.tokens_per_row} tokens; eval {self.num_eval_rows:,} rows"


def build_collator(run: RunConfig, tokenizer: PreTrainedTokenizerFast) -> MLMCollator:
    return MLMCollator(
        run.datacollator, special_ids=tokenizer.all_special_ids, vocab_size=len(tokenizer),
        pad_id=tokenizer.pad_token_id, mask_id=tokenizer.mask_token_id, seed=run.seed,
        max_seq_length=run.dataset.max_seq_length, packing=run.dataset.packing,
    )


def build_data(run: RunConfig, tokenizer: PreTrainedTokenizerFast, *, rank: int, world_size: int) -> DataBundle:
    """Train loader and eval batches for this rank (see :mod:`neobert_pt.data.loader` for the batch rule).

    Under several processes, call it on the main process first (``accelerator.main_process_first()``) so the
    others find the tokenized data in the cache.
    """
    collator = build_collator(run, tokenizer)
    tr = run.trainer

    def eval_of(rows: PackedRows | RowList) -> Iterator[Batch]:
        return iter_eval_batches(rows, collator, batch_size=tr.per_device_eval_batch_size,
                                 max_batches=tr.eval_max_batches, rank=rank, world_size=world_size)

    loader_args = dict(batch_size=tr.per_device_train_batch_size, seed=run.seed, rank=rank, world_size=world_size)
    if run.dataset.streaming:
        open_epoch, eval_rows = _streaming_rows(run, tokenizer)
        train = StreamingTrainLoader(open_epoch, collator, **loader_args)
        return DataBundle(train, run.dataset.max_seq_length, None, None, eval_rows, eval_of)
    train_rows, eval_rows = _map_rows(run, tokenizer)
    train = TrainLoader(train_rows, collator, **loader_args)
    return DataBundle(train, run.dataset.max_seq_length, len(train_rows), train_rows.num_tokens,
                      lambda: eval_rows, eval_of)


def _map_rows(run: RunConfig, tokenizer: PreTrainedTokenizerFast) -> tuple[PackedRows, PackedRows | None]:
    """Tokenize (cached) and pack; eval is ``eval_split`` or a fixed held-out fraction of the documents."""
    cfg = run.dataset
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


def _streaming_rows(run: RunConfig, tokenizer: PreTrainedTokenizerFast
                    ) -> tuple[Callable[[int], Iterator[Row]], Callable[[], RowList | None]]:
    """Streams: eval is the head of ``eval_split``, or the first documents of the train stream, held out from it.

    The held-out head is ``eval_max_batches * per_device_eval_batch_size`` documents (independent of the world
    size, so every world size trains on the same stream). Eval rows are materialized once, on first use.
    """
    cfg, tr = run.dataset, run.trainer
    stream = load_documents(run, cfg.split, streaming=True)
    head = tr.eval_max_batches * tr.per_device_eval_batch_size
    eval_docs: datasets.IterableDataset | None = None
    if cfg.eval_split is not None:
        eval_docs = load_documents(run, cfg.eval_split, streaming=True).take(head)
    elif cfg.eval_fraction > 0:
        eval_docs, stream = stream.take(head), stream.skip(head)
    shuffled = stream.shuffle(seed=run.seed, buffer_size=cfg.shuffle_buffer_size)

    def open_epoch(epoch: int) -> Iterator[Row]:
        shuffled.set_epoch(epoch)  # shuffle seed = run.seed + epoch: a re-opened epoch replays the same order
        return pack_stream(iter_token_documents(shuffled, tokenizer), cfg.max_seq_length, cfg.packing)

    cache: list[RowList | None] = []

    def eval_rows() -> RowList | None:
        if not cache:
            cache.append(None if eval_docs is None else RowList(list(
                pack_stream(iter_token_documents(eval_docs, tokenizer), cfg.max_seq_length, cfg.packing))))
        return cache[0]

    return open_epoch, eval_rows


__all__ = ["DataBundle", "build_collator", "build_data", "eval_plan"]
