"""Packing invariants: fixed-length rows, per-segment positions and ids, every token exactly once."""

from __future__ import annotations

import numpy as np
import pytest

from neobert_pt.data.packing import PackedRows, pack_stream

T = 32


def _rows(docs, packing):
    lengths = np.array([len(d) for d in docs])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return PackedRows(np.concatenate(docs).astype(np.int32), starts, lengths, T, packing)


@pytest.mark.parametrize("packing", [True, False])
def test_map_and_stream_rows_are_identical(make_documents, packing):
    docs = make_documents(60, 3 * T)
    mapped, streamed = _rows(docs, packing), list(pack_stream(docs, T, packing))
    assert len(mapped) == len(streamed)
    for i, row in enumerate(streamed):
        for key in ("input_ids", "position_ids", "document_ids"):
            np.testing.assert_array_equal(mapped[i][key], row[key])


def test_packed_rows_invariants_and_exact_coverage(make_documents):
    docs = make_documents(80, 3 * T, seed=1)
    rows = _rows(docs, packing=True)
    total = sum(len(d) for d in docs)
    assert len(rows) == -(-total // T)
    rebuilt = []  # (tokens of each document, rebuilt from the row segments in order)
    for r in range(len(rows)):
        row = rows[r]
        n = len(row["input_ids"])
        assert n == T or r == len(rows) - 1  # only the final row is short (padding comes later)
        seg_ids = row["document_ids"]
        assert seg_ids[0] == 0 and np.all(np.diff(seg_ids) >= 0) and np.all(np.diff(seg_ids) <= 1)
        for s in np.unique(seg_ids):
            where = np.flatnonzero(seg_ids == s)
            assert np.all(np.diff(where) == 1)  # a segment is contiguous
            np.testing.assert_array_equal(row["position_ids"][where], np.arange(len(where)))
            piece = row["input_ids"][where]
            if piece[0] == 101 and not (r > 0 and s == 0 and rebuilt and rebuilt[-1][-1] != 102):
                rebuilt.append(list(piece))  # a new document starts with [CLS]
            else:
                rebuilt[-1].extend(piece)  # continuation of a document cut at the previous row's end
    assert [list(d) for d in docs] == rebuilt


def test_long_document_is_chunked_not_truncated():
    doc = np.concatenate([[101], np.arange(1000, 1000 + 3 * T), [102]])
    for packing in (True, False):
        rows = _rows([doc], packing)
        np.testing.assert_array_equal(np.concatenate([rows[i]["input_ids"] for i in range(len(rows))]), doc)
        assert all((rows[i]["document_ids"] == 0).all() for i in range(len(rows)))
        assert all(rows[i]["position_ids"][0] == 0 for i in range(len(rows)))


def test_unpacked_rows_hold_one_document_chunk_each(make_documents):
    docs = make_documents(30, 2 * T, seed=2)
    rows = _rows(docs, packing=False)
    assert len(rows) == sum(-(-len(d) // T) for d in docs)
    assert all((rows[i]["document_ids"] == 0).all() and len(rows[i]["input_ids"]) <= T for i in range(len(rows)))
    starts = [i for i in range(len(rows)) if rows[i]["input_ids"][0] == 101]
    assert len(starts) == len(docs)


def test_selected_documents_pack_in_the_given_order(make_documents):
    docs = make_documents(10, T, seed=3)
    full = _rows(docs, packing=True)
    chosen = [7, 2, 5]
    subset = PackedRows(full.tokens, full.doc_starts[chosen], np.array([len(docs[i]) for i in chosen]), T, True)
    flat = np.concatenate([subset[i]["input_ids"] for i in range(len(subset))])
    np.testing.assert_array_equal(flat, np.concatenate([docs[i] for i in chosen]))
