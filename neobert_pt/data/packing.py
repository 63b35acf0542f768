"""Packing tokenized documents into fixed-length rows with per-document boundaries.

Documents arrive as ``[CLS] tokens [SEP]`` id arrays, in order. With packing they are concatenated and cut into
rows of exactly ``max_seq_length`` tokens; a document crossing a row boundary continues as a new segment at the
start of the next row (long documents are chunked, never truncated away). Without packing each document is cut
into chunks of at most ``max_seq_length`` tokens, one chunk per row. Either way a row is three equal-length arrays:

- ``input_ids``
- ``position_ids``: 0, 1, 2, ... restarting at every segment (a continued document restarts at 0 too),
- ``document_ids``: 0, 1, 2, ... the index of the segment within its row.

Rows are never padded here: only the final packed row (or a short unpacked chunk) is shorter than
``max_seq_length``; the collator pads it (document id -1, attention mask 0).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

Row = dict[str, np.ndarray]


class PackedRows:
    """Map-style rows over one flat token array, computed on access (no copy of the tokens).

    ``tokens`` holds every document back to back (e.g. the memory-mapped Arrow values of the tokenized dataset);
    ``doc_starts``/``doc_lengths`` select and order the documents that make up this split. Rows are cut from the
    *virtual* concatenation of the selected documents, so train and held-out eval can share one token array.
    """

    def __init__(self, tokens: np.ndarray, doc_starts: np.ndarray, doc_lengths: np.ndarray, max_seq_length: int,
                 packing: bool) -> None:
        if max_seq_length < 2:
            raise ValueError(f"max_seq_length must be at least 2, got {max_seq_length}")
        self.tokens = tokens
        self.doc_starts = np.asarray(doc_starts, dtype=np.int64)
        lengths = np.asarray(doc_lengths, dtype=np.int64)
        self.virt_starts = np.concatenate([[0], np.cumsum(lengths)])  # (D+1,) start of doc d in the concatenation
        self.max_seq_length = max_seq_length
        self.num_tokens = int(self.virt_starts[-1])
        if packing:
            self.row_starts = np.arange(0, self.num_tokens, max_seq_length, dtype=np.int64)
            self.row_lengths = np.minimum(max_seq_length, self.num_tokens - self.row_starts)
        else:
            chunks = -(-lengths // max_seq_length)  # ceil: chunks per document
            doc_of_row = np.repeat(np.arange(len(lengths)), chunks)
            chunk_in_doc = np.arange(len(doc_of_row)) - np.repeat(np.cumsum(chunks) - chunks, chunks)
            self.row_starts = self.virt_starts[doc_of_row] + chunk_in_doc * max_seq_length
            self.row_lengths = np.minimum(max_seq_length, self.virt_starts[doc_of_row + 1] - self.row_starts)

    def __len__(self) -> int:
        return len(self.row_starts)

    def __getitem__(self, index: int) -> Row:
        start = int(self.row_starts[index])
        virt = np.arange(start, start + int(self.row_lengths[index]), dtype=np.int64)  # (n,)
        doc = np.searchsorted(self.virt_starts, virt, side="right") - 1  # (n,) selected-document index per token
        segment_start = np.maximum(self.virt_starts[doc], start)  # a continued document restarts at the row start
        return {
            "input_ids": self.tokens[self.doc_starts[doc] + (virt - self.virt_starts[doc])].astype(np.int64),
            "position_ids": virt - segment_start,
            "document_ids": doc - doc[0],
        }


def pack_stream(documents: Iterable[np.ndarray], max_seq_length: int, packing: bool) -> Iterator[Row]:
    """The same rows as :class:`PackedRows`, produced lazily from an iterator of documents (for streaming)."""
    segments: list[np.ndarray] = []
    filled = 0
    for doc in documents:
        if not packing:
            for start in range(0, len(doc), max_seq_length):
                yield make_row([doc[start:start + max_seq_length]])
            continue
        pos = 0
        while pos < len(doc):
            take = min(max_seq_length - filled, len(doc) - pos)
            segments.append(doc[pos:pos + take])
            filled += take
            pos += take
            if filled == max_seq_length:
                yield make_row(segments)
                segments, filled = [], 0
    if segments:
        yield make_row(segments)


def make_row(segments: list[np.ndarray]) -> Row:
    return {
        "input_ids": np.concatenate(segments).astype(np.int64),
        "position_ids": np.concatenate([np.arange(len(s), dtype=np.int64) for s in segments]),
        "document_ids": np.concatenate([np.full(len(s), i, dtype=np.int64) for i, s in enumerate(segments)]),
    }


class RowList:
    """Rows held in memory (the materialized eval rows of a streaming dataset)."""

    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Row:
        return self.rows[index]
