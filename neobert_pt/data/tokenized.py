"""Tokenized shards: ``prepare`` tokenizes a corpus once; training reads the token files through memory maps.

Layout of a prepared directory::

    DIR/manifest.json            format, tokenizer fingerprint, source, dtype, per-shard counts and sha256
    DIR/shard_00000.tokens       every document's ``[CLS] ids [SEP]`` back to back (uint16, or uint32 if needed)
    DIR/shard_00000.docs         int64 offsets of the documents in the token file (documents + 1 entries)
    DIR/shard_00000.json         the shard's own record (written last: a shard without it is not done)
    DIR/tokenizer/               the tokenizer used (``tokenizer.name: DIR/tokenizer`` reproduces it)

Shards are contiguous document ranges of the source, in order, so the documents (and therefore the packed rows,
the eval hold-out and the masks) are exactly those of the map-style path on the same source. ``prepare`` writes
each shard to a temporary name and renames it into place, then writes the shard record, then (after every shard)
the manifest: an interrupted prepare leaves no half shard visible and a rerun continues with the missing shards.

Reading (:class:`TokenizedCorpus`) imports neither ``datasets`` nor anything that does: the GPU image trains from
shards without it. Token files are memory-mapped read-only (``mmap`` + ``np.frombuffer``, read-ahead off), so a rank touches only the pages of the rows it
reads; the per-document offsets (8 bytes per document) are the only arrays held in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neobert_pt.data.errors import DataError

logger = logging.getLogger(__name__)

FORMAT = "neobert_pt.tokenized/1"
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
DEFAULT_DOCS_PER_SHARD = 50_000


def shard_name(index: int) -> str:
    return f"shard_{index:05d}"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(out_dir: Path, index: int, documents: list[list[int]], dtype: np.dtype) -> dict[str, Any]:
    """Write one shard atomically (token file, offsets, then its record); return the record."""
    lengths = np.fromiter((len(d) for d in documents), dtype=np.int64, count=len(documents))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.fromiter((t for d in documents for t in d), dtype=dtype, count=int(offsets[-1]))
    name = shard_name(index)
    _write_atomic(out_dir / f"{name}.tokens", tokens.tobytes())
    _write_atomic(out_dir / f"{name}.docs", offsets.tobytes())
    record = {"name": name, "tokens": int(offsets[-1]), "documents": len(documents),
              "sha256": {"tokens": _sha256(out_dir / f"{name}.tokens"), "docs": _sha256(out_dir / f"{name}.docs")}}
    _write_atomic(out_dir / f"{name}.json", json.dumps(record).encode())
    return record


def read_shard_record(out_dir: Path, index: int, dtype: np.dtype) -> dict[str, Any] | None:
    """The record of a finished shard whose files have the recorded sizes, else None (to be redone)."""
    name = shard_name(index)
    try:
        record = json.loads((out_dir / f"{name}.json").read_text())
        ok = (out_dir / f"{name}.tokens").stat().st_size == record["tokens"] * dtype.itemsize and \
            (out_dir / f"{name}.docs").stat().st_size == (record["documents"] + 1) * 8
    except (OSError, ValueError, KeyError):
        return None
    return record if ok else None


def write_manifest(out_dir: Path, *, tokenizer: dict[str, Any], source: dict[str, Any], dtype: np.dtype,
                   shards: list[dict[str, Any]]) -> dict[str, Any]:
    manifest = {
        "format": FORMAT, "tokenizer": tokenizer, "source": source, "dtype": dtype.name,
        "num_tokens": sum(s["tokens"] for s in shards), "num_documents": sum(s["documents"] for s in shards),
        "shards": shards,
    }
    _write_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


class ShardedTokens:
    """The shards' token files as one virtual flat array (indexable by an int64 index array, like ``np.ndarray``)."""

    def __init__(self, maps: list[np.ndarray], starts: np.ndarray) -> None:
        self.maps = maps
        self.starts = starts  # (S+1,) first global token index of each shard, then the total

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index, dtype=np.int64)
        if index.size == 0:
            return np.zeros(0, dtype=self.maps[0].dtype if self.maps else np.uint16)
        first = int(np.searchsorted(self.starts, index.min(), side="right")) - 1
        if index.max() < self.starts[first + 1]:  # the usual case: one shard
            return self.maps[first][index - self.starts[first]]
        shard = np.searchsorted(self.starts, index, side="right") - 1
        out = np.empty(index.shape, dtype=self.maps[first].dtype)
        for s in np.unique(shard):
            where = shard == s
            out[where] = self.maps[s][index[where] - self.starts[s]]
        return out


@dataclass
class TokenizedCorpus:
    """A prepared directory opened for reading: tokens (memory-mapped), document starts and lengths."""

    path: Path
    manifest: dict[str, Any]
    tokens: ShardedTokens
    doc_starts: np.ndarray  # (D,) global token index of each document
    doc_lengths: np.ndarray  # (D,)

    @property
    def fingerprint(self) -> str:
        return self.manifest["tokenizer"]["fingerprint"]

    @property
    def file_bytes(self) -> int:
        return sum(m.nbytes for m in self.tokens.maps)


def _map_tokens(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    """A read-only zero-copy array over a token file. ``MADV_RANDOM`` turns off read-ahead, so reading a row
    maps the pages of that row only (rows are read in shuffled order; read-ahead would map whole neighbourhoods)."""
    if count == 0:
        return np.zeros(0, dtype=dtype)
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        mapped.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mapped, dtype=dtype, count=count)


def open_tokenized(path: str | os.PathLike[str], *, fingerprint: str | None = None) -> TokenizedCorpus:
    """Open a prepared directory; every problem (missing, truncated, other tokenizer) is one :class:`DataError`."""
    root = Path(os.path.expanduser(str(path)))
    manifest_file = root / MANIFEST
    if not manifest_file.is_file():
        hint = " (an interrupted prepare: rerun the same prepare command to finish it)" \
            if any(root.glob("shard_*.json")) else ""
        raise DataError(f"dataset.data_files '{path}': no {MANIFEST} there{hint}; create it with "
                        "`python -m neobert_pt.data prepare CONFIG --output DIR`.")
    try:
        manifest = json.loads(manifest_file.read_text())
    except ValueError as err:
        raise DataError(f"{manifest_file} is not valid JSON ({err}); prepare the directory again.") from err
    if manifest.get("format") != FORMAT:
        raise DataError(f"{manifest_file} has format {manifest.get('format')!r}, this version reads {FORMAT!r}; "
                        "prepare the directory again.")
    theirs = manifest["tokenizer"]["fingerprint"]
    if fingerprint is not None and fingerprint != theirs:
        raise DataError(
            f"tokenizer mismatch: {root} was tokenized with tokenizer {theirs} "
            f"({manifest['tokenizer'].get('name')}) but this run's tokenizer is {fingerprint}; set tokenizer.name "
            f"to {root / TOKENIZER_DIR} or prepare the data again with this tokenizer."
        )
    dtype = np.dtype(manifest["dtype"])
    maps, token_starts, doc_starts, doc_lengths = [], [0], [], []
    for shard in manifest["shards"]:
        tok_file, doc_file = root / f"{shard['name']}.tokens", root / f"{shard['name']}.docs"
        for f, expected in ((tok_file, shard["tokens"] * dtype.itemsize), (doc_file, (shard["documents"] + 1) * 8)):
            size = f.stat().st_size if f.is_file() else None
            if size != expected:
                state = "missing" if size is None else f"truncated or altered ({size:,} bytes, expected {expected:,})"
                raise DataError(f"tokenized shard {f} is {state}; rerun prepare on {root} to rebuild it.")
        offsets = np.fromfile(doc_file, dtype=np.int64)
        maps.append(_map_tokens(tok_file, dtype, shard["tokens"]))
        doc_starts.append(offsets[:-1] + token_starts[-1])
        doc_lengths.append(np.diff(offsets))
        token_starts.append(token_starts[-1] + shard["tokens"])
    starts = np.asarray(token_starts, dtype=np.int64)
    return TokenizedCorpus(root, manifest, ShardedTokens(maps, starts),
                           np.concatenate(doc_starts) if doc_starts else np.zeros(0, np.int64),
                           np.concatenate(doc_lengths) if doc_lengths else np.zeros(0, np.int64))


def verify_checksums(path: str | os.PathLike[str]) -> list[str]:
    """Names of the files whose sha256 differs from the manifest (reads every byte; ``prepare --verify``)."""
    corpus = open_tokenized(path)
    bad = []
    for shard in corpus.manifest["shards"]:
        for kind in ("tokens", "docs"):
            f = corpus.path / f"{shard['name']}.{kind}"
            if _sha256(f) != shard["sha256"][kind]:
                bad.append(f.name)
    return bad
