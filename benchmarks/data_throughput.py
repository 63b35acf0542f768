"""Data delivery per rank: tokens/s and the training process's wait per micro-batch, for every source kind.

Each case builds the real loader of rank 0 of W simulated ranks (W in {1, 8}) with 0 or 2 DataLoader workers at
seq 1024, per-device batch 32, and pulls micro-batches:

* ``tokens/s/rank``: non-pad tokens delivered per second by a loop that only pulls batches (no step);
* ``wait ms`` (median and p90 over the steady state): the time ``next(loader)`` blocks when every micro-batch is
  followed by a simulated ``--step-ms`` step (a sleep: the CPU is free, as while a GPU computes).

Kinds: ``tokenized`` (shards written by ``prepare``'s writer from a generated corpus, memory-mapped), ``map`` (the
same tokens as an in-memory array, what ``datasets`` hands the map-style path), ``stream`` (the embedded corpus's
text, repeated epoch after epoch, tokenized on the fly by the embedded WordPiece tokenizer: each rank tokenizes its
own lanes only) and ``mixture`` (two tokenized sources 3:1). The corpus is large enough that no case wraps an
epoch. The process runs torch with one thread (``--threads``), so the training-process numbers are one core's.
Also reported: the private-memory (RssAnon) growth of opening and reading the tokenized corpus vs its file size.

    python benchmarks/data_throughput.py                # full: ~100 MB of shards in a temp dir
    python benchmarks/data_throughput.py --smoke        # seconds; CI runs it
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import emit  # noqa: E402
from neobert_pt.config.schema import RunConfig  # noqa: E402
from neobert_pt.data.loader import BatchPlan, MapBatches, MixtureBatches, StreamBatches, TrainLoader  # noqa: E402
from neobert_pt.data.packing import PackedRows  # noqa: E402
from neobert_pt.data.pipeline import build_collator  # noqa: E402
from neobert_pt.data.tokenized import open_tokenized, token_dtype, write_manifest, write_shard  # noqa: E402
from neobert_pt.data.tokenizer import EMBEDDED_CORPUS, build_tokenizer, encode_texts  # noqa: E402

SEQ, BATCH = 1024, 32


def rss_anon() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return 0


def write_corpus(out: Path, num_tokens: int, shards: int, seed: int) -> None:
    """Generated documents (lengths 50..4000 tokens) in the shard format of ``prepare``."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    per_shard = num_tokens // shards
    for i in range(shards):
        lengths = rng.integers(50, 4000, per_shard // 2000 + 1)
        docs = [np.concatenate([[101], rng.integers(1000, 30000, n - 2), [102]]) for n in lengths]
        records.append(write_shard(out, i, docs, token_dtype(30522)))
    write_manifest(out, tokenizer={"fingerprint": "benchmark", "name": "generated", "vocab_size": 30522},
                   source={"name": "generated"}, dtype=token_dtype(30522), shards=records)


def corpus_rows(path: Path) -> PackedRows:
    corpus = open_tokenized(path)
    return PackedRows(corpus.tokens, corpus.doc_starts, corpus.doc_lengths, SEQ, True)


def make_batches(kind: str, world: int, ctx: dict):
    plan = BatchPlan(batch_size=BATCH, rank=0, world_size=world, rows_per_step=BATCH * world)
    collator = ctx["collator"]
    if kind == "tokenized":
        return MapBatches(corpus_rows(ctx["web"]), collator, plan, seed=0)
    if kind == "map":
        rows = corpus_rows(ctx["web"])
        in_memory = np.concatenate(rows.tokens.maps).astype(np.int32)  # what the Arrow column holds
        return MapBatches(PackedRows(in_memory, rows.doc_starts, np.diff(rows.virt_starts), SEQ, True), collator,
                          plan, seed=0)
    if kind == "mixture":
        return MixtureBatches([("web", corpus_rows(ctx["web"]), 3.0), ("code", corpus_rows(ctx["code"]), 1.0)],
                              collator, plan, seed=0)
    texts, tokenizer = ctx["texts"], ctx["tokenizer"]

    def open_epoch(epoch: int):
        return (texts[i] for i in np.random.default_rng([0, epoch]).permutation(len(texts)))

    def encode(batch: list[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int64) for ids in encode_texts(tokenizer, batch)]

    return StreamBatches(open_epoch, encode, collator, plan, seed=0)


def measure(kind: str, world: int, workers: int, ctx: dict, args) -> dict:
    row = {"kind": kind, "W": world, "workers": workers}
    loader = TrainLoader(make_batches(kind, world, ctx), num_workers=workers, prefetch_factor=4)
    for _ in range(args.warmup):  # worker start-up, first pages, stream read-ahead
        next(loader)
    start, tokens = time.perf_counter(), 0
    for _ in range(args.batches):
        tokens += int(next(loader)["attention_mask"].sum())
    row["tokens_per_s_per_rank"] = tokens / (time.perf_counter() - start)
    waits = []
    for _ in range(args.batches):
        t0 = time.perf_counter()
        next(loader)
        waits.append((time.perf_counter() - t0) * 1e3)
        time.sleep(args.step_ms / 1e3)
    loader.close()
    steady = waits[len(waits) // 4:]
    row["wait_ms_median"] = statistics.median(steady)
    row["wait_ms_p90"] = float(np.percentile(steady, 90))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny corpus and few batches (CI)")
    parser.add_argument("--tokens", type=int, default=50_000_000, help="generated corpus size (tokens)")
    parser.add_argument("--batches", type=int, default=40, help="timed micro-batches per measurement")
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--step-ms", type=float, default=20.0, help="simulated step time for the wait measurement")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kinds", default="tokenized,map,stream,mixture")
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.batches, args.warmup = 3_000_000, 4, 1
    torch.set_num_threads(args.threads)
    run = RunConfig()
    run.dataset.max_seq_length = SEQ
    tokenizer = build_tokenizer(run)
    with gzip.open(EMBEDDED_CORPUS, "rt") as f:
        texts = [json.loads(line)["text"] for line in f]
    rows = []
    with tempfile.TemporaryDirectory(prefix="data_throughput_") as tmp:
        web, code = Path(tmp) / "web", Path(tmp) / "code"
        write_corpus(web, args.tokens, 4, seed=1)
        write_corpus(code, args.tokens // 4, 1, seed=2)
        ctx = {"web": web, "code": code, "texts": texts, "tokenizer": tokenizer,
               "collator": build_collator(run, tokenizer)}
        before = rss_anon()
        probe = TrainLoader(make_batches("tokenized", 8, ctx))
        for _ in range(args.batches):
            next(probe)
        file_bytes = sum(f.stat().st_size for f in web.glob("*.tokens"))
        rss = {"tokenized_file_bytes": file_bytes, "rss_anon_growth_bytes": rss_anon() - before}
        rss["rss_anon_growth_fraction"] = rss["rss_anon_growth_bytes"] / file_bytes
        del probe
        for kind in args.kinds.split(","):
            for world, workers in itertools.product((1, 8), (0, 2)):
                rows.append(measure(kind, world, workers, ctx, args))
    meta = {"device": f"CPU, torch threads {args.threads}, {os.cpu_count()} cores visible", "seq": SEQ,
            "batch": BATCH, "step_ms": args.step_ms, "corpus_tokens": args.tokens, **rss}
    emit("data_throughput", meta, rows, ["kind", "W", "workers", "tokens_per_s_per_rank", "wait_ms_median",
                                         "wait_ms_p90"])
    print(f"\nprivate memory (RssAnon) growth from the tokenized corpus: {rss['rss_anon_growth_bytes'] / 2**20:.1f} MiB "
          f"for {file_bytes / 2**20:.1f} MiB of token files ({100 * rss['rss_anon_growth_fraction']:.1f}%)")


if __name__ == "__main__":
    main()
