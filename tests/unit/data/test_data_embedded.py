"""The shipped corpus and vocab, and every way of building a tokenizer."""

from __future__ import annotations

import gzip
import json
import re

import pytest

from neobert_pt.config.schema import RunConfig
from neobert_pt.data.errors import DataError
from neobert_pt.data.sources import EMBEDDED_CORPUS
from neobert_pt.data.tokenizer import EMBEDDED_VOCAB, build_tokenizer, trained_tokenizer_path


def test_embedded_corpus_is_clean_prose_of_reasonable_size():
    assert 100_000 < EMBEDDED_CORPUS.stat().st_size < 400_000  # compressed, a few hundred KB
    with gzip.open(EMBEDDED_CORPUS, "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    chars = sum(map(len, docs))
    assert 300_000 <= chars <= 600_000
    assert len(docs) >= 150
    assert all(300 <= len(d) <= 4_500 for d in docs), sorted(map(len, docs))[:3]
    junk = re.compile(r"###|p\.\d+:\d+|\[\[ed:|project gutenberg|etext", re.I)
    assert not [d[:80] for d in docs if junk.search(d)]
    assert (EMBEDDED_CORPUS.parent / "NOTICE").exists() and (EMBEDDED_CORPUS.parent / "README.md").exists()


def test_embedded_tokenizer_has_bert_ids_and_no_builtin_truncation(tokenizer):
    assert sum(1 for _ in open(EMBEDDED_VOCAB, encoding="utf-8")) == len(tokenizer) == 30522
    ids = (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id,
           tokenizer.mask_token_id)
    assert ids == (0, 100, 101, 102, 103)
    enc = tokenizer("Hello World")["input_ids"]
    assert enc == [101, tokenizer.convert_tokens_to_ids("hello"), tokenizer.convert_tokens_to_ids("world"), 102]
    long_text = "word " * 3 * tokenizer.model_max_length
    assert len(tokenizer.backend_tokenizer.encode(long_text, add_special_tokens=False).ids) == \
        3 * tokenizer.model_max_length
    assert tokenizer.decode(tokenizer("Thou art MORE lovely")["input_ids"], skip_special_tokens=True) == \
        "thou art more lovely"


def test_model_max_length_follows_max_seq_length():
    run = RunConfig()
    run.dataset.max_seq_length = 96
    assert build_tokenizer(run).model_max_length == 96


def test_trained_tokenizer_on_the_embedded_corpus(tmp_path):
    run = RunConfig()
    run.tokenizer.name = "train"
    run.tokenizer.vocab_size = 600
    run.dataset.max_documents = 40
    run.dataset.cache_dir = str(tmp_path)
    tok = build_tokenizer(run)
    assert len(tok) == 600
    assert [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id] == \
        [0, 1, 2, 3, 4]
    ids = tok("the king of denmark")["input_ids"]
    assert ids[0] == 2 and ids[-1] == 3 and 1 not in ids  # corpus words are covered, no [UNK]
    assert trained_tokenizer_path(run).exists()
    assert build_tokenizer(run).get_vocab() == tok.get_vocab()  # reused from the cache: stable ids on resume
    run.tokenizer.vocab_size = 500
    assert len(build_tokenizer(run)) == 500  # other settings, other cache entry


def test_missing_local_tokenizer_path_is_one_clear_line():
    run = RunConfig()
    run.tokenizer.name = "./no/such/tokenizer_dir"
    with pytest.raises(DataError, match=r"^tokenizer.name './no/such/tokenizer_dir' is not an existing directory"):
        build_tokenizer(run)


def test_unreachable_hub_tokenizer_says_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = RunConfig()
    run.tokenizer.name = "neobert-pt-tests/no-such-tokenizer"
    with pytest.raises(DataError) as info:
        build_tokenizer(run)
    message = str(info.value)
    assert "'neobert-pt-tests/no-such-tokenizer'" in message and "offline" in message and "\n" not in message
