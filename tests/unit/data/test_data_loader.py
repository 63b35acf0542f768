"""Loaders: exact resume, epochs, rank slices, world-size equivalence and change, workers, streams, mixtures."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from neobert_pt.config.schema import DataCollatorConfig
from neobert_pt.data.collator import MLMCollator
from neobert_pt.data.errors import DataError
from neobert_pt.data.loader import (
    BatchPlan,
    MapBatches,
    MixtureBatches,
    StreamBatches,
    TrainLoader,
    eval_plan,
    iter_eval_batches,
    mixture_schedule,
)
from neobert_pt.data.packing import PackedRows

T = 16


@pytest.fixture
def docs(make_documents):
    return make_documents(40, 2 * T, seed=5)


def _rows(docs):
    lengths = np.array([len(d) for d in docs])
    return PackedRows(np.concatenate(docs), np.r_[0, np.cumsum(lengths)[:-1]], lengths, T, True)


@pytest.fixture
def rows(docs):
    return _rows(docs)


@pytest.fixture
def collator():
    return MLMCollator(DataCollatorConfig(), special_ids=[0, 100, 101, 102, 103], vocab_size=30522, pad_id=0,
                       mask_id=103, seed=3, max_seq_length=T, packing=True)


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def _plan(batch_size, rank=0, world_size=1, accumulation=1):
    return BatchPlan(batch_size=batch_size, rank=rank, world_size=world_size,
                     rows_per_step=batch_size * world_size * accumulation)


def _map_loader(rows, collator, batch_size=4, rank=0, world_size=1, seed=11, accumulation=1, workers=0):
    return TrainLoader(MapBatches(rows, collator, _plan(batch_size, rank, world_size, accumulation), seed=seed),
                       num_workers=workers, prefetch_factor=2)


def test_resume_yields_exactly_the_next_batches_across_epochs(rows, collator):
    reference = _map_loader(rows, collator)
    per_epoch = reference.batches.rows_per_epoch // 4
    expected = list(itertools.islice(reference, 3 * per_epoch))
    for cut in (1, per_epoch - 1, per_epoch, per_epoch + 2):
        interrupted = _map_loader(rows, collator)
        list(itertools.islice(interrupted, cut))
        resumed = _map_loader(rows, collator)
        resumed.load_state_dict(interrupted.state_dict())
        got = list(itertools.islice(resumed, 3 * per_epoch - cut))
        assert all(_same(a, b) for a, b in zip(got, expected[cut:], strict=True))


def test_epochs_cover_rows_once_and_never_split_a_global_batch(rows, collator):
    loader = _map_loader(rows, collator, batch_size=3, accumulation=2)
    assert loader.batches.rows_per_epoch == len(rows) // 6 * 6
    first, second = loader.batches.order(0), loader.batches.order(1)
    assert sorted(first.tolist()) == list(range(len(rows))) and not np.array_equal(first, second)


def test_workers_give_identical_batches_and_resume(rows, collator):
    expected = list(itertools.islice(_map_loader(rows, collator, batch_size=3), 25))
    with_workers = _map_loader(rows, collator, batch_size=3, workers=2)
    got = list(itertools.islice(with_workers, 11))
    state = with_workers.state_dict()
    with_workers.close()
    resumed = _map_loader(rows, collator, batch_size=3, workers=1)
    resumed.load_state_dict(state)
    got += list(itertools.islice(resumed, 14))
    resumed.close()
    assert all(_same(a, b) for a, b in zip(got, expected, strict=True))


def test_rank_slices_are_disjoint_cover_and_match_one_big_process(rows, collator):
    single = _map_loader(rows, collator, batch_size=6)
    ranks = [_map_loader(rows, collator, batch_size=2, rank=r, world_size=3) for r in range(3)]
    for _ in range(single.batches.rows_per_epoch // 6 + 2):  # crosses an epoch boundary
        big = next(single)
        parts = [next(loader) for loader in ranks]
        for key in big:  # same rows AND same masks: W ranks x B == 1 process x W*B
            assert torch.equal(torch.cat([p[key] for p in parts]), big[key])


def test_resume_on_another_world_size_with_the_same_global_batch(rows, collator):
    # 1 process x batch 2 x accumulation 2 == 2 processes x batch 2 x accumulation 1: 4 rows per optimizer step.
    single = _map_loader(rows, collator, batch_size=2, accumulation=2)
    expected = list(itertools.islice(single, 12))
    first = _map_loader(rows, collator, batch_size=2, accumulation=2)
    list(itertools.islice(first, 4))  # two optimizer steps
    ranks = [_map_loader(rows, collator, batch_size=2, rank=r, world_size=2) for r in range(2)]
    for loader in ranks:
        loader.load_state_dict(first.state_dict())
    for step in range(2, 6):
        parts = [next(loader) for loader in ranks]
        assert _same(parts[0], expected[2 * step]) and _same(parts[1], expected[2 * step + 1])
    back = _map_loader(rows, collator, batch_size=2, accumulation=2)  # and back from 2 processes to 1
    back.load_state_dict(ranks[1].state_dict())
    assert all(_same(next(back), e) for e in expected[12:] + list(itertools.islice(single, 2)))


def test_changed_global_batch_and_foreign_state_are_refused(rows, collator):
    state = _map_loader(rows, collator, batch_size=2, world_size=2).state_dict()
    with pytest.raises(DataError, match="global batch was 4 rows per optimizer step.*is 2 now"):
        _map_loader(rows, collator, batch_size=2).load_state_dict(state)
    # Same processes and rows per device, another accumulation (a phase's batch warmup): the saved layout is kept.
    saved = _map_loader(rows, collator, batch_size=2, accumulation=3)
    list(itertools.islice(saved, 40))
    adopted = _map_loader(rows, collator, batch_size=2)
    adopted.load_state_dict(saved.state_dict())
    assert adopted.plan.rows_per_step == 6 and all(_same(next(adopted), next(saved)) for _ in range(30))
    state = _map_loader(rows, collator, batch_size=2).state_dict()
    with pytest.raises(DataError, match="seed was 11"):
        _map_loader(rows, collator, batch_size=2, seed=12).load_state_dict(state)


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


# ---- streams --------------------------------------------------------------------------------------------------
class CountingEncoder:
    """Stands in for the tokenizer: 'text' i -> document i; counts the documents it was asked to tokenize."""

    def __init__(self, docs):
        self.docs, self.calls = docs, 0

    def __call__(self, texts):
        self.calls += len(texts)
        return [self.docs[int(t)] for t in texts]


def _stream_loader(docs, collator, batch_size=3, rank=0, world_size=1, accumulation=1, workers=0, encoder=None,
                   tokenize_batch=256):
    def open_epoch(epoch):
        order = np.random.default_rng([99, epoch]).permutation(len(docs))  # stands in for a seeded shuffle buffer
        return (str(i) for i in order)

    encoder = encoder or CountingEncoder(docs)
    return TrainLoader(StreamBatches(open_epoch, encoder, collator, _plan(batch_size, rank, world_size, accumulation),
                                     seed=3, tokenize_batch=tokenize_batch), num_workers=workers, prefetch_factor=2)


def test_streaming_resume_is_exact_across_epochs(docs, collator):
    reference = _stream_loader(docs, collator)
    expected = list(itertools.islice(reference, 40))  # several passes over a ~5 batch stream
    for cut in (1, 7, 13):
        first = _stream_loader(docs, collator)
        list(itertools.islice(first, cut))
        resumed = _stream_loader(docs, collator, workers=2 if cut == 7 else 0)
        resumed.load_state_dict(first.state_dict())
        got = list(itertools.islice(resumed, 40 - cut))
        resumed.close()
        assert all(_same(a, b) for a, b in zip(got, expected[cut:], strict=True))


def test_streaming_ranks_match_one_big_process_and_tokenize_their_share(make_documents, collator):
    docs = make_documents(4000, 2 * T, seed=1)
    single_encoder = CountingEncoder(docs)
    single = _stream_loader(docs, collator, batch_size=16, encoder=single_encoder, tokenize_batch=8)
    encoders = [CountingEncoder(docs) for _ in range(8)]
    ranks = [_stream_loader(docs, collator, batch_size=2, rank=r, world_size=8, encoder=encoders[r],
                            tokenize_batch=8) for r in range(8)]
    for _ in range(20):
        big = next(single)
        parts = [next(loader) for loader in ranks]
        assert all(torch.equal(torch.cat([p[k] for p in parts]), big[k]) for k in big)
    # Each rank tokenized only the documents of its own lanes: 1/8 of the single process's work (up to one
    # tokenize batch of read-ahead).
    per_rank = [e.calls for e in encoders]
    assert single_encoder.calls > 300
    assert max(per_rank) <= single_encoder.calls / 8 + 8 and abs(sum(per_rank) - single_encoder.calls) <= 64


def test_streaming_accumulation_and_world_size_change(docs, collator):
    single = _stream_loader(docs, collator, batch_size=2, accumulation=2)
    expected = list(itertools.islice(single, 10))
    first = _stream_loader(docs, collator, batch_size=2, accumulation=2)
    list(itertools.islice(first, 4))
    ranks = [_stream_loader(docs, collator, batch_size=2, rank=r, world_size=2) for r in range(2)]
    for loader in ranks:
        loader.load_state_dict(first.state_dict())
    for step in range(2, 5):
        parts = [next(loader) for loader in ranks]
        assert _same(parts[0], expected[2 * step]) and _same(parts[1], expected[2 * step + 1])


def test_empty_stream_is_a_clear_error(collator):
    batches = StreamBatches(lambda epoch: iter(()), CountingEncoder([]), collator, _plan(2), seed=3,
                            holdout="the first 1600 documents")
    with pytest.raises(DataError, match="no documents after the eval hold-out .the first 1600"):
        next(TrainLoader(batches))


# ---- mixtures -------------------------------------------------------------------------------------------------
def test_mixture_schedule_matches_the_weights():
    source, index, counts = mixture_schedule([0.6, 0.25, 0.1, 0.05])
    assert counts.tolist() == [6000, 2500, 1000, 500]
    for n in (1000, 10_000):
        share = np.bincount(source[:n], minlength=4) / n
        assert np.all(np.abs(share - [0.6, 0.25, 0.1, 0.05]) <= 0.01)
    for s in range(4):
        assert index[source == s].tolist() == list(range(counts[s]))
    for bad in ([1.0, 0.0], [], [1.0, -2.0]):
        with pytest.raises(DataError, match="weights must all be > 0"):
            mixture_schedule(bad)


def _mixture_loader(sources, collator, batch_size=4, rank=0, world_size=1, workers=0):
    return TrainLoader(MixtureBatches(sources, collator, _plan(batch_size, rank, world_size), seed=7),
                       num_workers=workers, prefetch_factor=2)


def test_mixture_is_exact_on_resume_ranks_and_counts_tokens_per_source(make_documents, collator):
    sources = [("web", _rows(make_documents(60, 2 * T, seed=1)), 3.0),
               ("code", _rows(make_documents(15, 2 * T, seed=2)), 1.0)]
    single = _mixture_loader(sources, collator, batch_size=8)
    expected = list(itertools.islice(single, 30))  # wraps the small source several times
    first = _mixture_loader(sources, collator, batch_size=8)
    list(itertools.islice(first, 9))
    ranks = [_mixture_loader(sources, collator, batch_size=4, rank=r, world_size=2, workers=r) for r in range(2)]
    for loader in ranks:
        loader.load_state_dict(first.state_dict())
    for m in range(9, 30):
        parts = [next(loader) for loader in ranks]
        assert all(torch.equal(torch.cat([p[k] for p in parts]), expected[m][k]) for k in expected[m])
    ranks[1].close()
    tokens = ranks[0].state_dict()["source_tokens"]
    assert tokens == single.state_dict()["source_tokens"]
    assert sum(tokens.values()) == sum(int(b["attention_mask"].sum()) for b in expected)
    assert 2.5 < tokens["web"] / tokens["code"] < 3.5
