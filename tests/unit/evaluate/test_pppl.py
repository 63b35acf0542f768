"""Exact pseudo-perplexity: the batched implementation equals a one-position-at-a-time loop; buckets and caps."""

import math

import pytest
import torch

from neobert_pt import NeoBERTForMaskedLM
from neobert_pt.evaluate.pppl import bucket_of, pseudo_perplexity, windows_of


def brute_force_pppl(model, docs, max_length, cls_id=2, sep_id=3, mask_id=4):
    nll, n = 0.0, 0
    for doc in docs:
        for w in windows_of(doc, cls_id, sep_id, max_length):
            for i in range(1, len(w) - 1):
                ids = torch.tensor([w])
                ids[0, i] = mask_id
                with torch.no_grad():
                    logits = model(input_ids=ids).logits[0, i]
                nll -= torch.log_softmax(logits.double(), -1)[w[i]].item()
                n += 1
    return math.exp(nll / n), n


def test_batched_pppl_equals_brute_force(tiny_config):
    torch.manual_seed(0)
    model = NeoBERTForMaskedLM(tiny_config).eval()
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(5, tiny_config.vocab_size, (n,), generator=g).tolist() for n in (7, 30, 3)]
    expected, n = brute_force_pppl(model, docs, max_length=12)
    got = pseudo_perplexity(model, docs, cls_id=2, sep_id=3, mask_id=4, max_length=12, batch_size=4,
                            buckets=(4, 8, 16), progress=False)
    assert got["tokens"] == n == 40
    assert got["pppl"] == pytest.approx(expected, rel=1e-5)
    # 40 tokens in windows of <= 10: 7 | 10, 10, 10 | 3 → window lengths 9, 12, 12, 12, 5
    assert got["windows"] == 5
    assert got["tokens_len_9-16"] == 37 and got["tokens_len_5-8"] == 3
    solo, _ = brute_force_pppl(model, [docs[2]], max_length=12)
    assert got["pppl_len_5-8"] == pytest.approx(solo, rel=1e-5)


def test_max_tokens_caps_the_scored_tokens(tiny_config):
    model = NeoBERTForMaskedLM(tiny_config).eval()
    docs = [list(range(5, 25)), list(range(5, 15))]
    got = pseudo_perplexity(model, docs, cls_id=2, sep_id=3, mask_id=4, max_length=64, max_tokens=25,
                            progress=False)
    assert got["tokens"] == 25
    assert bucket_of(128, (128, 256)) == "1-128" and bucket_of(129, (128, 256)) == "129-256"
    assert bucket_of(300, (128, 256)) == ">256"


def test_read_texts_formats(tmp_path):
    import gzip
    import json

    from neobert_pt.evaluate.data import read_texts
    from neobert_pt.evaluate.errors import EvalError

    (tmp_path / "a.txt").write_text("first doc\nstill first\n\n\nsecond doc\n")
    assert read_texts(tmp_path / "a.txt") == ["first doc\nstill first", "second doc"]
    rows = [{"text": "one"}, {"text": ""}, {"text": "two"}]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_texts(tmp_path / "b.jsonl") == ["one", "two"]
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    assert read_texts(tmp_path / "c.jsonl.gz") == ["one", "two"]
    with pytest.raises(EvalError, match="no 'body' field"):
        read_texts(tmp_path / "b.jsonl", column="body")
