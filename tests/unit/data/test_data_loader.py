"""Loaders: exact resume, epochs, rank slices, world-size equivalence, eval batches, streaming."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from neobert_pt.config.schema import DataCollatorConfig
from neobert_pt.data.collator import MLMCollator
from neobert_pt.data.errors import DataError
from neobert_pt.data.loader import StreamingTrainLoader, TrainLoader, eval_plan, iter_eval_batches
from neobert_pt.data.packing import PackedRows, pack_stream

T = 16


@pytest.fixture
def docs(make_documents):
    return make_documents(40, 2 * T, seed=5)


@pytest.fixture
def rows(docs):
    lengths = np.array([len(d) for d in docs])
    return PackedRows(np.concatenate(docs), np.r_[0, np.cumsum(lengths)[:-1]], lengths, T, True)


@pytest.fixture
def collator():
    return MLMCollator(DataCollatorConfig(), special_ids=[0, 100, 101, 102, 103], vocab_size=30522, pad_id=0,
                       mask_id=103, seed=3, max_seq_length=T, packing=True)


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def _map_loader(rows, collator, batch_size=4, rank=0, world_size=1, seed=11):
    return TrainLoader(rows, collator, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)


def test_resume_yields_exactly_the_next_batches_across_epochs(rows, collator):
    reference = _map_loader(rows, collator)
    per_epoch = reference.batches_per_epoch
    expected = list(itertools.islice(reference, 3 * per_epoch))
    interrupted = _map_loader(rows, collator)
    for cut in (1, per_epoch - 1, per_epoch, per_epoch + 2):
        interrupted = _map_loader(rows, collator)
        list(itertools.islice(interrupted, cut))
        resumed = _map_loader(rows, collator)
        resumed.load_state_dict(interrupted.state_dict())
        got = list(itertools.islice(resumed, 3 * per_epoch - cut))
        assert all(_same(a, b) for a, b in zip(got, expected[cut:], strict=True))


def test_epochs_cover_rows_once_with_a_new_order_each_epoch(rows, collator):
    loader = _map_loader(rows, collator, batch_size=3)
    n = loader.batches_per_epoch * 3
    assert loader.batches_per_epoch == len(rows) // 3
    first, second = loader.order(0)[:n], loader.order(1)[:n]
    assert len(set(first.tolist())) == n and not np.array_equal(first, second)
    list(itertools.islice(loader, loader.batches_per_epoch + 1))
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["batch_index"] == 1


def test_rank_slices_are_disjoint_cover_and_match_one_big_process(rows, collator):
    single = _map_loader(rows, collator, batch_size=6)
    ranks = [_map_loader(rows, collator, batch_size=2, rank=r, world_size=3) for r in range(3)]
    for _ in range(single.batches_per_epoch + 2):  # crosses an epoch boundary
        big = next(single)
        parts = [next(loader) for loader in ranks]
        for key in big:  # same rows AND same masks: W ranks x B == 1 process x W*B
            assert torch.equal(torch.cat([p[key] for p in parts]), big[key])
    order = single.order(0)
    slices = [set(order[r * 2:(r + 1) * 2].tolist()) for r in range(3)]
    assert not (slices[0] & slices[1]) and not (slices[1] & slices[2]) and len(set.union(*slices)) == 6


def test_world_size_change_and_foreign_state_are_refused(rows, collator):
    state = _map_loader(rows, collator, batch_size=2, world_size=2).state_dict()
    with pytest.raises(DataError, match="written with 2 process.*this run has 1"):
        _map_loader(rows, collator, batch_size=2).load_state_dict(state)
    state = _map_loader(rows, collator, batch_size=2).state_dict()
    with pytest.raises(DataError, match="batch_size was 2"):
        _map_loader(rows, collator, batch_size=3).load_state_dict(state)


def test_too_little_data_for_one_global_batch_is_a_clear_error(rows, collator):
    with pytest.raises(DataError, match="fewer than one global batch"):
        _map_loader(rows, collator, batch_size=len(rows) + 1)


def test_eval_batches_equal_count_on_every_rank_and_fixed_masks(rows, collator):
    assert eval_plan(10, batch_size=4, max_batches=5, world_size=3) == (3, 1)
    assert eval_plan(2, batch_size=4, max_batches=5, world_size=3) == (0, 0)
    assert eval_plan(100, batch_size=4, max_batches=5, world_size=2) == (4, 5)
    per_rank = [list(iter_eval_batches(rows, collator, batch_size=4, max_batches=3, rank=r, world_size=2))
                for r in range(2)]
    assert [len(b) for b in per_rank] == [3, 3]
    again = list(iter_eval_batches(rows, collator, batch_size=4, max_batches=3, rank=1, world_size=2))
    assert all(_same(a, b) for a, b in zip(again, per_rank[1], strict=True))
    assert not torch.equal(per_rank[0][0]["input_ids"], per_rank[1][0]["input_ids"])


def _stream_loader(docs, collator, batch_size=3, rank=0, world_size=1):
    def open_epoch(epoch):
        order = np.random.default_rng([99, epoch]).permutation(len(docs))  # stands in for a seeded shuffle buffer
        return pack_stream((docs[i] for i in order), T, True)

    return StreamingTrainLoader(open_epoch, collator, batch_size=batch_size, seed=3, rank=rank,
                                world_size=world_size)


def test_streaming_resume_is_exact_and_epochs_roll_over(docs, collator):
    reference = _stream_loader(docs, collator)
    expected = list(itertools.islice(reference, 40))  # several epochs of a ~4-6 batch stream
    assert reference.state_dict()["epoch"] >= 2
    for cut in (1, 7, 13):
        first = _stream_loader(docs, collator)
        list(itertools.islice(first, cut))
        resumed = _stream_loader(docs, collator)
        resumed.load_state_dict(first.state_dict())
        got = list(itertools.islice(resumed, 40 - cut))
        assert all(_same(a, b) for a, b in zip(got, expected[cut:], strict=True))


def test_streaming_ranks_match_one_big_process(docs, collator):
    single = _stream_loader(docs, collator, batch_size=4)
    ranks = [_stream_loader(docs, collator, batch_size=2, rank=r, world_size=2) for r in range(2)]
    for _ in range(12):
        big = next(single)
        parts = [next(loader) for loader in ranks]
        assert all(torch.equal(torch.cat([p[k] for p in parts]), big[k]) for k in big)
    with pytest.raises(DataError, match="written with 2 process"):
        _stream_loader(docs, collator).load_state_dict(ranks[0].state_dict())
