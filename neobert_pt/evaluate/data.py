"""Evaluation data: the embedded corpus, local files, ``save_to_disk`` folders or Hub datasets.

A Hub dataset that cannot be reached (offline, no network, not cached) becomes ONE :class:`EvalError` line that names
what was asked and how to pass local files of the same schema instead.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from neobert_pt.evaluate.errors import EvalError

EMBEDDED_CORPUS = Path(__file__).resolve().parent.parent / "data" / "embedded" / "corpus.jsonl.gz"
_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".txt": "text"}


def embedded_documents() -> list[str]:
    """The embedded corpus' documents in file order (read directly: no ``datasets`` needed)."""
    with gzip.open(EMBEDDED_CORPUS, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def read_texts(path: str | Path, column: str = "text") -> list[str]:
    """Documents of a local ``.txt`` (blank-line separated), ``.jsonl``/``.json`` (``column``) or ``.jsonl.gz`` file."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"text file {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        raw = f.read()
    if any(suffix in (".json", ".jsonl") for suffix in path.suffixes):
        rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
        if rows and column not in rows[0]:
            raise EvalError(f"{path}: no '{column}' field (fields: {', '.join(rows[0])})")
        return [r[column] for r in rows if r.get(column)]
    return [block.strip() for block in raw.split("\n\n") if block.strip()]


def load_splits(hub_name: str, config_name: str | None, local: str | Path | None, flag: str):
    """A ``datasets.DatasetDict`` from ``local`` (a ``save_to_disk`` folder or a folder of ``<split>.<ext>`` files)
    or, without it, from the Hub dataset ``hub_name``/``config_name``."""
    import datasets

    if local is not None:
        local = Path(local)
        if (local / "dataset_dict.json").is_file():
            return datasets.load_from_disk(str(local))
        files: dict[str, str] = {}
        for file in sorted(local.glob("*")) if local.is_dir() else []:
            ext = file.suffix.lower()
            if ext in _BUILDERS:
                files[file.name[: -len(ext)]] = str(file)
        if not files:
            raise EvalError(f"{flag} {local}: expected a datasets.save_to_disk folder or <split>.jsonl/.csv/.tsv/"
                            ".parquet files (e.g. train.jsonl, validation.jsonl)")
        exts = {Path(f).suffix.lower() for f in files.values()}
        if len(exts) != 1:
            raise EvalError(f"{flag} {local}: mixed file types {sorted(exts)}; use one format for every split")
        ext = exts.pop()
        kwargs = {"delimiter": "\t"} if ext == ".tsv" else {}
        return datasets.load_dataset(_BUILDERS[ext], data_files=files, **kwargs)
    try:
        return datasets.load_dataset(hub_name, config_name)
    except Exception as err:  # ConnectionError, FileNotFoundError, DatasetNotFoundError, ... vary by version
        label = f"'{hub_name}'" + (f" (config '{config_name}')" if config_name else "")
        raise EvalError(f"Hub dataset {label} cannot be reached (offline or no network) and is not cached; use local "
                        f"files of the same schema: {flag} DIR (a datasets.save_to_disk folder or DIR/train.jsonl, "
                        "DIR/validation.jsonl)") from err
