"""Tokenized shards: prepare (parallel, resumable, atomic), memory-mapped reading equal to the map-style path,
one-line errors, no ``datasets`` import on the read path, and RSS growth far below the token files' size."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from neobert_pt.config.errors import ConfigError
from neobert_pt.config.loader import load_config
from neobert_pt.data import DataError, build_data
from neobert_pt.data.prepare import embedded_texts, prepare, prepare_texts
from neobert_pt.data.prepare import main as prepare_main
from neobert_pt.data.tokenized import MANIFEST, open_tokenized, verify_checksums

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture
def prepared(run, tmp_path):
    out = tmp_path / "tok"
    manifest = prepare(run, out, num_proc=2, docs_per_shard=40, progress=False)
    return out, manifest


def _tokenized_run(run, out):
    run.dataset.name, run.dataset.data_files = "tokenized", [str(out)]
    return run


def test_prepare_writes_shards_manifest_and_tokenizer(prepared):
    out, manifest = prepared
    assert manifest["dtype"] == "uint16" and len(manifest["shards"]) == -(-manifest["num_documents"] // 40) > 2
    corpus = open_tokenized(out)
    assert len(corpus.doc_lengths) == manifest["num_documents"] and len(corpus.tokens) == manifest["num_tokens"]
    assert verify_checksums(out) == []
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    ids = corpus.tokens[np.arange(corpus.doc_starts[5], corpus.doc_starts[5] + corpus.doc_lengths[5])]
    assert ids[0] == 101 and ids[-1] == 102  # [CLS] ... [SEP] of the embedded BERT vocab


def test_tokenized_rows_and_batches_equal_the_map_style_path(run, prepared, tokenizer):
    out, _ = prepared
    map_style = build_data(run, tokenizer, rank=0, world_size=1)
    tokenized = build_data(_tokenized_run(run, out), tokenizer, rank=0, world_size=1)
    assert tokenized.num_train_rows == map_style.num_train_rows and tokenized.num_eval_rows == map_style.num_eval_rows
    for a, b in zip(itertools.islice(map_style.train, 5), itertools.islice(tokenized.train, 5), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    for a, b in zip(map_style.eval_batches(), tokenized.eval_batches(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_prepare_texts_writes_the_same_shards_as_prepare_without_datasets(run, prepared, tokenizer, tmp_path):
    """The GPU suite's path (embedded corpus read with gzip/json, no `datasets`) gives the same tokens and documents."""
    out, manifest = prepared
    again = prepare_texts(embedded_texts(), tokenizer, tmp_path / "texts", source={"name": "embedded"},
                          docs_per_shard=40)
    assert again["tokenizer"]["fingerprint"] == manifest["tokenizer"]["fingerprint"]
    assert [(s["tokens"], s["documents"], s["sha256"]) for s in again["shards"]] == \
        [(s["tokens"], s["documents"], s["sha256"]) for s in manifest["shards"]]
    assert verify_checksums(tmp_path / "texts") == [] and len(embedded_texts(7)) == 7


def test_interrupted_prepare_resumes_and_never_shows_a_half_shard(run, tmp_path, prepared):
    out, manifest = prepared
    (out / MANIFEST).unlink()  # as if killed before the end: two shards missing, one half-written temp file
    for name in ("shard_00001", "shard_00003"):
        (out / f"{name}.json").unlink()
    (out / ".shard_00001.tokens.tmp123").write_bytes(b"\0" * 10)
    with pytest.raises(DataError, match="interrupted prepare: rerun"):
        open_tokenized(out)
    again = prepare(run, out, num_proc=1, docs_per_shard=40, progress=False)
    assert again["shards"] == manifest["shards"]


def test_tokenizer_mismatch_and_damaged_shards_are_one_line_errors(run, prepared, tokenizer):
    out, _ = prepared
    with pytest.raises(DataError, match=r"tokenizer mismatch: .* tokenizer [0-9a-f]{16} .* is [0-9a-f]{16}"):
        open_tokenized(out, fingerprint="0123456789abcdef")
    tokens = out / "shard_00002.tokens"
    tokens.write_bytes(tokens.read_bytes()[:-2])
    with pytest.raises(DataError, match="shard_00002.tokens is truncated or altered") as err:
        build_data(_tokenized_run(run, out), tokenizer, rank=0, world_size=1)
    assert "\n" not in str(err.value)
    (out / "shard_00001.docs").unlink()
    with pytest.raises(DataError, match="shard_00001.docs is missing"):
        open_tokenized(out)
    with pytest.raises(ConfigError, match="'tokenized' reads one prepared directory"):
        load_config(None, ["--dataset.name", "tokenized"])


def test_prepare_command_line(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = prepare_main(["prepare", "--output", str(out), "--no-progress", "--dataset.max_documents", "30",
                       "--dataset.cache_dir", str(tmp_path / "cache")])
    assert rc == 0 and "30 documents" in capsys.readouterr().out
    assert prepare_main(["verify", str(out)]) == 0
    assert prepare_main(["prepare", "--output", str(out), "--dataset.bogus", "1"]) == 2
    assert "dataset.bogus" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RssAnon from /proc")
def test_reading_imports_no_datasets_and_copies_nothing(run, tmp_path):
    """Train batches from shards in a process where ``import datasets`` fails; private memory grows far less than
    the token files (the mapped file pages are the shared page cache, not a per-rank copy)."""
    out = tmp_path / "big"
    # A corpus of ~6 MB of uint16 tokens written directly in the shard format.
    from neobert_pt.data.tokenized import token_dtype, write_manifest, write_shard
    from neobert_pt.data.tokenizer import build_tokenizer, tokenizer_fingerprint

    out.mkdir()
    rng = np.random.default_rng(0)
    shards = []
    for i in range(3):
        docs = [[101, *rng.integers(1000, 30000, int(n)).tolist(), 102] for n in rng.integers(100, 3000, 700)]
        shards.append(write_shard(out, i, docs, token_dtype(30522)))
    fingerprint = tokenizer_fingerprint(build_tokenizer(run))
    manifest = write_manifest(out, tokenizer={"fingerprint": fingerprint, "name": "embedded", "vocab_size": 30522},
                              source={"name": "synthetic"}, dtype=token_dtype(30522), shards=shards)
    code = textwrap.dedent(f"""
        import sys, resource, itertools
        sys.modules["datasets"] = None  # any `import datasets` raises ImportError
        from neobert_pt.config.loader import load_config
        from neobert_pt.data import build_data, build_tokenizer
        run = load_config(None, ["--dataset.name", "tokenized", "--dataset.data_files", "[{out}]",
                                 "--dataset.max_seq_length", "512", "--trainer.per_device_train_batch_size", "8"])
        tok = build_tokenizer(run)
        def rss():  # private (anonymous) resident memory: what each rank would hold on its own
            line = next(l for l in open("/proc/self/status") if l.startswith("RssAnon:"))
            return int(line.split()[1]) * 1024
        warm = build_data(run, tok, rank=3, world_size=8)  # first use of torch, numpy, the collator: fixed costs
        list(itertools.islice(warm.train, 20))
        before = rss()
        data = build_data(run, tok, rank=3, world_size=8)
        batches = list(itertools.islice(data.train, 20))
        grown = rss() - before
        assert all(b["input_ids"].shape == (8, 512) for b in batches)
        print("GROWN", grown)
    """)
    env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    grown = int(done.stdout.split("GROWN")[1])
    size = manifest["num_tokens"] * 2
    assert grown <= 0.10 * size, f"RSS grew {grown:,} bytes for {size:,} bytes of token files"


def test_tokenized_with_workers_resumes_exactly(run, prepared, tokenizer):
    out, _ = prepared
    run = _tokenized_run(run, out)
    expected = list(itertools.islice(build_data(run, tokenizer, rank=1, world_size=2).train, 8))
    run.trainer.dataloader_num_workers = 2
    first = build_data(run, tokenizer, rank=1, world_size=2).train
    got = list(itertools.islice(first, 3))
    state = first.state_dict()
    first.close()
    resumed = build_data(run, tokenizer, rank=1, world_size=2).train
    resumed.load_state_dict(json.loads(json.dumps(state)))  # the state is what a checkpoint stores (JSON)
    got += list(itertools.islice(resumed, 5))
    resumed.close()
    assert all(torch.equal(a[k], b[k]) for a, b in zip(got, expected, strict=True) for k in a)
