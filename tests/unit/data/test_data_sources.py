"""Sources and build_data end to end: embedded, local text/JSON/parquet, streaming, errors, eval hold-out."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from neobert_pt.data import DataError, build_data
from neobert_pt.data.sources import holdout_split, load_documents

TEXTS = [f"Document number {i} tells of the king, the ghost and {i % 7} players at Elsinore. " * (1 + i % 5)
         for i in range(30)]


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def _write(tmp_path, fmt: str) -> str:
    if fmt == "text":
        path = tmp_path / "docs.txt"
        path.write_text("\n".join(TEXTS) + "\n")
    elif fmt == "json":
        path = tmp_path / "docs.jsonl"
        path.write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "docs.parquet"
        pq.write_table(pa.table({"text": TEXTS}), path)
    return str(path)


@pytest.mark.parametrize("fmt", ["text", "json", "parquet"])
def test_local_files_are_tokenized_packed_and_fully_used(run, tokenizer, tmp_path, fmt):
    run.dataset.name = fmt
    run.dataset.data_files = [_write(tmp_path, fmt)]
    run.dataset.text_column = "body" if fmt == "json" else "text"
    run.dataset.eval_fraction = 0.1
    bundle = build_data(run, tokenizer, rank=0, world_size=1)
    expected_tokens = sum(len(tokenizer(t)["input_ids"]) for t in TEXTS)
    eval_tokens = sum(int(b["attention_mask"].sum()) for b in bundle.eval_batches())
    assert bundle.num_train_tokens + eval_tokens == expected_tokens  # eval budget covers the 3 held-out docs here
    assert bundle.num_train_rows == -(-bundle.num_train_tokens // 64)
    batch = next(bundle.train)
    assert batch["input_ids"].shape == (4, 64) and (batch["labels"] != -100).any()


def test_embedded_default_and_cached_tokenization(run, tokenizer):
    first = build_data(run, tokenizer, rank=0, world_size=1)
    assert first.num_train_rows > 1000 and first.tokens_per_row == 64
    evals = list(first.eval_batches())
    assert len(evals) == 2 and all(_same(a, b) for a, b in zip(evals, first.eval_batches(), strict=True))
    second = build_data(run, tokenizer, rank=0, world_size=1)  # tokenized data comes from the cache
    assert second.num_train_tokens == first.num_train_tokens and _same(next(first.train), next(second.train))
    assert "rows" in first.describe()


def test_max_documents_and_holdout_are_deterministic(run, tokenizer):
    run.dataset.max_documents = 20
    assert len(load_documents(run, "train")) == 20
    train, held = holdout_split(1000, 0.05)
    assert len(held) == 50 and len(np.intersect1d(train, held)) == 0 and len(train) + len(held) == 1000
    assert np.array_equal(holdout_split(1000, 0.05)[1], held)
    assert len(holdout_split(10, 0.0)[1]) == 0 and len(holdout_split(10, 0.001)[1]) == 1


def test_streaming_local_json_resumes_exactly(run, tokenizer, tmp_path):
    run.dataset.name = "json"
    run.dataset.data_files = [_write(tmp_path, "json")]
    run.dataset.text_column = "body"
    run.dataset.streaming = True
    run.dataset.shuffle_buffer_size = 8
    run.dataset.max_seq_length = 32
    run.trainer.per_device_train_batch_size = 2
    run.trainer.eval_max_batches = 1
    run.trainer.per_device_eval_batch_size = 2
    reference = build_data(run, tokenizer, rank=0, world_size=1)
    expected = list(itertools.islice(reference.train, 12))
    assert reference.num_train_rows is None and reference.num_eval_rows > 0
    interrupted = build_data(run, tokenizer, rank=0, world_size=1)
    list(itertools.islice(interrupted.train, 5))
    resumed = build_data(run, tokenizer, rank=0, world_size=1)
    resumed.train.load_state_dict(interrupted.train.state_dict())
    assert all(_same(a, b) for a, b in zip(itertools.islice(resumed.train, 7), expected[5:], strict=True))


def test_missing_file_and_column_are_one_clear_line(run, tokenizer, tmp_path):
    run.dataset.name = "json"
    run.dataset.data_files = [str(tmp_path / "nope" / "*.jsonl")]
    with pytest.raises(DataError, match=r"^dataset.data_files: no file matches '.*nope/\*\.jsonl'\.$"):
        build_data(run, tokenizer, rank=0, world_size=1)
    run.dataset.data_files = [_write(tmp_path, "json")]
    with pytest.raises(DataError, match=r"text_column 'text' is not a column .*columns: body, id"):
        build_data(run, tokenizer, rank=0, world_size=1)
    run.dataset.name, run.dataset.data_files = "text", None
    with pytest.raises(DataError, match="set dataset.data_files"):
        build_data(run, tokenizer, rank=0, world_size=1)


def test_unreachable_hub_dataset_says_offline(run, tokenizer, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    run.dataset.name = "neobert-pt-tests/no-such-dataset"
    with pytest.raises(DataError) as info:
        build_data(run, tokenizer, rank=0, world_size=1)
    assert "'neobert-pt-tests/no-such-dataset'" in str(info.value) and "offline" in str(info.value)


def test_unpacked_rows_hold_one_document_each(run, tokenizer, tmp_path):
    run.dataset.name, run.dataset.data_files = "text", [_write(tmp_path, "text")]
    run.dataset.packing = False
    run.dataset.eval_fraction = 0.0
    bundle = build_data(run, tokenizer, rank=0, world_size=1)
    lengths = [len(tokenizer(t)["input_ids"]) for t in TEXTS]
    assert bundle.num_train_rows == sum(-(-n // 64) for n in lengths) and bundle.num_eval_rows == 0
    batch = next(bundle.train)
    assert batch["document_ids"].max() == 0 and batch["input_ids"].shape[1] % 8 == 0
    assert list(bundle.eval_batches()) == []
    run.dataset.eval_split = "validation"
    with pytest.raises(DataError, match="only a 'train' split"):
        build_data(run, tokenizer, rank=0, world_size=1)


def test_streaming_holdout_that_swallows_the_corpus_is_one_clear_line(run, tokenizer, tmp_path):
    run.dataset.name, run.dataset.data_files = "text", [_write(tmp_path, "text")]
    run.dataset.streaming = True
    run.trainer.eval_max_batches, run.trainer.per_device_eval_batch_size = 10, 4  # a 40-document head > 30 documents
    bundle = build_data(run, tokenizer, rank=0, world_size=1)
    with pytest.raises(DataError, match=r"no documents after the eval hold-out \(the first trainer.eval_max_batches "
                                        r"x per_device_eval_batch_size = 40 documents.*set dataset.eval_split"):
        next(bundle.train)


def _mixture_run(run, tmp_path, tokenizer):
    from neobert_pt.data.prepare import prepare

    prepared = tmp_path / "tok"
    prepare(run, prepared, docs_per_shard=100, progress=False)  # the embedded corpus as tokenized shards
    run.dataset.mixture = [
        {"label": "web", "name": "tokenized", "data_files": [str(prepared)], "weight": 0.7},
        {"label": "code", "name": "json", "data_files": [_write(tmp_path, "json")], "text_column": "body",
         "weight": 0.3},
    ]
    return run


def test_mixture_of_tokenized_shards_and_local_json(run, tokenizer, tmp_path):
    run = _mixture_run(run, tmp_path, tokenizer)
    bundle = build_data(run, tokenizer, rank=0, world_size=1)
    assert bundle.train.labels == ["web", "code"] and "from web, code" in bundle.describe()
    share = np.bincount([bundle.train.batches.locate(p)[0] for p in range(10_000)], minlength=2) / 10_000
    assert np.all(np.abs(share - [0.7, 0.3]) <= 0.01)
    expected = list(itertools.islice(bundle.train, 6))
    assert bundle.num_eval_rows > 0 and len(list(bundle.eval_batches())) == 2
    resumed = build_data(run, tokenizer, rank=0, world_size=1)
    interrupted = build_data(run, tokenizer, rank=0, world_size=1)
    list(itertools.islice(interrupted.train, 2))
    resumed.train.load_state_dict(interrupted.train.state_dict())
    assert all(_same(a, b) for a, b in zip(itertools.islice(resumed.train, 4), expected[2:], strict=True))
    assert resumed.train.state_dict()["source_tokens"] == bundle.train.state_dict()["source_tokens"]


def test_mixture_errors_are_one_line(run, tokenizer, tmp_path, monkeypatch):
    from neobert_pt.config.errors import ConfigError
    from neobert_pt.config.loader import load_config

    for entry, message in (({"name": "json", "weight": 0}, r"mixture\[0\].weight must be a number > 0"),
                           ({"name": "json", "weight": -1.0}, r"weight must be a number > 0"),
                           ({"weight": 1.0}, r"mixture\[0\].name is required"),
                           ({"name": "json", "weight": 1, "colour": 3}, "unknown key.*colour"),
                           ({"name": "json", "weight": 1}, r"mixture\[0\] \(name 'json'\) reads local files")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, ["--dataset.mixture", json.dumps([entry])])
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    run.dataset.mixture = [{"name": "neobert-pt-tests/no-such-source", "weight": 1.0}]
    with pytest.raises(DataError, match="'neobert-pt-tests/no-such-source' could not be loaded: offline"):
        build_data(run, tokenizer, rank=0, world_size=1)
