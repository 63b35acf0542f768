"""``python -m neobert_pt.data prepare CONFIG --output DIR [--num-proc N] [--docs-per-shard K] [overrides]``.

Tokenizes the configured source (``dataset.*``, ``tokenizer.*`` of the run config) once into the shard layout of
:mod:`neobert_pt.data.tokenized`. Shards are written by ``--num-proc`` processes with a progress bar; a rerun of
the same command skips the shards that are already complete, so an interrupted prepare resumes where it stopped.
Train from the result with ``--dataset.name tokenized --dataset.data_files DIR``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from neobert_pt.config.errors import ConfigError
from neobert_pt.config.loader import load_config
from neobert_pt.config.schema import RunConfig
from neobert_pt.data.tokenized import (
    DEFAULT_DOCS_PER_SHARD,
    MANIFEST,
    TOKENIZER_DIR,
    read_shard_record,
    token_dtype,
    verify_checksums,
    write_manifest,
    write_shard,
)

_WORK: dict[str, Any] = {}  # set in the parent before the pool forks: (documents, tokenizer, output, dtype, K)


def _prepare_shard(index: int) -> dict[str, Any]:
    from neobert_pt.data.tokenizer import encode_texts

    docs, tokenizer, out, dtype, per_shard = (_WORK[k] for k in ("docs", "tokenizer", "out", "dtype", "per_shard"))
    texts = docs[index * per_shard:(index + 1) * per_shard]["text"]
    return write_shard(out, index, encode_texts(tokenizer, texts), dtype)


def prepare(run: RunConfig, output: str | os.PathLike[str], *, num_proc: int = 1,
            docs_per_shard: int = DEFAULT_DOCS_PER_SHARD, progress: bool = True) -> dict[str, Any]:
    """Tokenize ``run``'s training source into ``output``; returns the manifest. Resumable, shard by shard."""
    from tqdm.auto import tqdm

    from neobert_pt.data.errors import DataError
    from neobert_pt.data.sources import load_documents
    from neobert_pt.data.tokenizer import build_tokenizer, tokenizer_fingerprint

    cfg = run.dataset
    if cfg.name == "tokenized" or cfg.mixture:
        raise DataError("prepare reads a text source: set dataset.name to 'embedded', a builder ('json', 'text', "
                        "'parquet', 'csv') with dataset.data_files, or a Hub dataset (one source, no mixture).")
    out = Path(os.path.expanduser(str(output)))
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(run)
    fingerprint = tokenizer_fingerprint(tokenizer)
    docs = load_documents(run, cfg.split, streaming=False)
    dtype = token_dtype(len(tokenizer))
    num_shards = max(1, -(-len(docs) // docs_per_shard))
    tok_dir = out / TOKENIZER_DIR
    stale = (out / MANIFEST).is_file() and (out / TOKENIZER_DIR).is_dir() and \
        tokenizer_fingerprint(_load_saved(tok_dir)) != fingerprint
    if stale:
        raise DataError(f"--output {out} already holds shards of another tokenizer; choose an empty directory.")
    tokenizer.save_pretrained(tok_dir)
    records: dict[int, dict[str, Any]] = {}
    for i in range(num_shards):
        record = read_shard_record(out, i, dtype)
        if record is not None:
            records[i] = record
    todo = [i for i in range(num_shards) if i not in records]
    _WORK.update(docs=docs, tokenizer=tokenizer, out=out, dtype=dtype, per_shard=docs_per_shard)
    bar = tqdm(total=num_shards, initial=len(records), desc=f"Tokenizing into {out}", unit="shard",
               disable=not progress)
    try:
        if num_proc > 1 and len(todo) > 1:
            with multiprocessing.get_context("fork").Pool(min(num_proc, len(todo))) as pool:
                for record in pool.imap_unordered(_prepare_shard, todo):
                    records[int(record["name"].split("_")[1])] = record
                    bar.update()
        else:
            for i in todo:
                records[i] = _prepare_shard(i)
                bar.update()
    finally:
        bar.close()
        _WORK.clear()
    source = {"name": cfg.name, "config_name": cfg.config_name, "split": cfg.split, "data_files": cfg.data_files,
              "text_column": cfg.text_column, "max_documents": cfg.max_documents}
    return write_manifest(out, tokenizer={"fingerprint": fingerprint, "name": run.tokenizer.name,
                                          "vocab_size": len(tokenizer)},
                          source=source, dtype=dtype, shards=[records[i] for i in range(num_shards)])


def prepare_texts(texts: list[str], tokenizer: Any, output: str | os.PathLike[str], *, source: dict[str, Any],
                  docs_per_shard: int = DEFAULT_DOCS_PER_SHARD) -> dict[str, Any]:
    """Tokenize ``texts`` (already in memory) into the same shard layout as :func:`prepare`; returns the manifest.

    No ``datasets`` import: the GPU suite (``benchmarks/gpu_suite.py``) writes the embedded corpus this way on an
    image without ``datasets`` and trains from it with ``--dataset.name tokenized``. One process, not resumable:
    meant for small in-memory corpora. ``source`` is recorded in the manifest as given.
    """
    from neobert_pt.data.tokenizer import encode_texts, tokenizer_fingerprint

    out = Path(os.path.expanduser(str(output)))
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(len(tokenizer))
    tokenizer.save_pretrained(out / TOKENIZER_DIR)
    shards = [write_shard(out, i, encode_texts(tokenizer, texts[start:start + docs_per_shard]), dtype)
              for i, start in enumerate(range(0, max(1, len(texts)), docs_per_shard))]
    fingerprint = tokenizer_fingerprint(tokenizer)
    return write_manifest(out, tokenizer={"fingerprint": fingerprint, "name": tokenizer.name_or_path or "in-memory",
                                          "vocab_size": len(tokenizer)}, source=source, dtype=dtype, shards=shards)


def embedded_texts(max_documents: int | None = None) -> list[str]:
    """The documents of the embedded corpus (``dataset.name: embedded``) in file order, read without ``datasets``."""
    from neobert_pt.data.tokenizer import EMBEDDED_CORPUS

    with gzip.open(EMBEDDED_CORPUS, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    return texts if max_documents is None else texts[:max_documents]


def _load_saved(path: Path) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(path)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m neobert_pt.data",
        description="Data tools. `prepare` tokenizes the configured dataset into memory-mappable shards; train from "
                    "them with --dataset.name tokenized --dataset.data_files DIR. `verify` checks their checksums.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize dataset.* of CONFIG into shards",
                       usage="python -m neobert_pt.data prepare [CONFIG] --output DIR [options] [--section.key VALUE ...]",
                       description="CONFIG is a run config YAML (default: the built-in defaults, i.e. the embedded "
                                   "corpus); any --section.key VALUE override of pretrain.py is accepted.")
    p.add_argument("--output", required=True, help="directory for the shards (created; rerun to resume)")
    p.add_argument("--num-proc", type=int, default=1, help="tokenizing processes (default 1)")
    p.add_argument("--docs-per-shard", type=int, default=DEFAULT_DOCS_PER_SHARD,
                   help=f"documents per shard (default {DEFAULT_DOCS_PER_SHARD})")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    v = sub.add_parser("verify", help="recompute every shard's sha256 and compare with the manifest")
    v.add_argument("directory")
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "verify":
            if rest:
                parser.error(f"unrecognized arguments: {' '.join(rest)}")
            bad = verify_checksums(args.directory)
            print(f"{args.directory}: " + ("all checksums match" if not bad else f"checksum mismatch: {', '.join(bad)}"))
            return 1 if bad else 0
        config = rest.pop(0) if rest and not rest[0].startswith("-") and "=" not in rest[0] else None
        if args.num_proc < 1 or args.docs_per_shard < 1:
            parser.error("--num-proc and --docs-per-shard must be >= 1")
        run = load_config(config, rest)
        manifest = prepare(run, args.output, num_proc=args.num_proc, docs_per_shard=args.docs_per_shard,
                           progress=not args.no_progress)
    except ConfigError as err:
        print(f"python -m neobert_pt.data: error: {err}", file=sys.stderr)
        return 2
    print(f"{args.output}: {manifest['num_documents']:,} documents, {manifest['num_tokens']:,} tokens "
          f"({np.dtype(manifest['dtype']).name}) in {len(manifest['shards'])} shard(s); tokenizer "
          f"{manifest['tokenizer']['fingerprint']}. Train with --dataset.name tokenized --dataset.data_files "
          f"{args.output}")
    return 0
