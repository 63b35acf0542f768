"""Where documents come from: the embedded corpus, local text/JSON/parquet files, or a Hub dataset (maybe streamed).

Also owns tokenization of documents into ``[CLS] tokens [SEP]`` id arrays and the deterministic eval hold-out.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
from collections.abc import Iterable, Iterator
from functools import partial

import datasets
import numpy as np
from transformers import PreTrainedTokenizerFast

from neobert_pt.config.schema import RunConfig
from neobert_pt.data.errors import DataError
from neobert_pt.data.holdout import HOLDOUT_SEED, holdout_split
from neobert_pt.data.tokenizer import EMBEDDED_CORPUS, encode_texts

LOCAL_BUILDERS = ("text", "json", "parquet", "csv")
TOKENIZE_BATCH = 256

Documents = datasets.Dataset | datasets.IterableDataset


def load_documents(run: RunConfig, split: str, *, streaming: bool | None = None) -> Documents:
    """The raw documents of ``split`` with the single column ``text`` (``max_documents`` applied)."""
    cfg = run.dataset
    streaming = cfg.streaming if streaming is None else streaming
    name = cfg.name
    if name in LOCAL_BUILDERS + ("embedded",) and split != "train":
        raise DataError(f"split '{split}' (dataset.split / dataset.eval_split): '{name}' data has only a "
                        "'train' split; set dataset.eval_split null to hold out dataset.eval_fraction of the documents instead.")
    try:
        if name == "embedded":
            ds = datasets.load_dataset("json", data_files=str(EMBEDDED_CORPUS), split="train", streaming=streaming,
                                       cache_dir=cfg.cache_dir)
        elif name in LOCAL_BUILDERS:
            with _quiet_builder_errors():  # a parse error becomes our one-line DataError below, not a log dump
                ds = datasets.load_dataset(name, data_files=_existing_files(name, cfg.data_files), split="train",
                                           streaming=streaming, cache_dir=cfg.cache_dir)
        else:
            ds = datasets.load_dataset(name, cfg.config_name, split=split, streaming=streaming,
                                       cache_dir=cfg.cache_dir, data_files=cfg.data_files)
    except DataError:
        raise
    except datasets.exceptions.DatasetGenerationError as err:  # empty / malformed / non-UTF-8 local files
        raise DataError(_generation_failure(name, cfg.data_files, err)) from err
    except StopIteration:  # what `datasets` raises for an empty local file
        raise DataError(f"dataset.data_files: {', '.join(cfg.data_files or [name])} holds no documents (empty "
                        "file?); point dataset.data_files at a file with data.") from None
    except (ConnectionError, FileNotFoundError, ValueError) as err:
        raise DataError(_load_failure(name, cfg.config_name, split, err)) from err
    return _text_only(ds, cfg.text_column, name, cfg.max_documents)


@contextlib.contextmanager
def _quiet_builder_errors() -> Iterator[None]:
    """The local builders log a parse failure at ERROR level before raising; the raise is reported instead."""
    log = logging.getLogger("datasets.packaged_modules")
    previous = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(previous)


def _generation_failure(name: str, patterns: list[str] | None, err: BaseException) -> str:
    """One line naming the files and the parser's own complaint (the root cause, where the file/line is)."""
    cause: BaseException = err
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    detail = " ".join(str(cause).split())[:300] or type(cause).__name__
    files = ", ".join(patterns or []) or name
    return (f"dataset.data_files: the '{name}' builder could not read {files}: {type(cause).__name__}: {detail}. "
            "Check that the file is non-empty, UTF-8 and in that format.")


def _existing_files(builder: str, patterns: list[str] | None) -> list[str]:
    if not patterns:
        raise DataError(f"dataset.name '{builder}' reads local files: set dataset.data_files to a file or glob.")
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise DataError(f"dataset.data_files: no file matches '{pattern}'.")
        files.extend(matches)
    return files


def _load_failure(name: str, config_name: str | None, split: str, err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    offline = os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "", "false") or \
        os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or "offline" in text.lower()
    label = f"'{name}'" + (f" (config '{config_name}')" if config_name else "")
    if isinstance(err, ConnectionError) or (offline and "find" in text.lower()):
        return f"dataset.name {label} could not be loaded: offline (HF_HUB_OFFLINE / no network) and not cached."
    first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
    if "split" in text.lower():
        return f"dataset {label} has no split '{split}': {first_line}"
    return f"dataset.name {label} could not be loaded: {first_line}"


def _text_only(ds: Documents, column: str, name: str, max_documents: int | None) -> Documents:
    columns = ds.column_names
    if columns is not None and column not in columns:
        raise DataError(f"dataset.text_column '{column}' is not a column of '{name}' (columns: {', '.join(columns)}).")
    if columns is not None and columns != [column]:
        ds = ds.select_columns([column])
    if column != "text":
        ds = ds.rename_column(column, "text")
    if max_documents is not None:
        if isinstance(ds, datasets.IterableDataset):
            ds = ds.take(max_documents)
        else:
            ds = ds.select(range(min(max_documents, len(ds))))
    return ds


def iter_training_texts(run: RunConfig) -> Iterator[str]:
    """Every training document's text (used to train a tokenizer)."""
    for example in load_documents(run, run.dataset.split):
        if example["text"]:
            yield example["text"]


def _tokenize_batch(batch: dict[str, list], tokenizer: PreTrainedTokenizerFast) -> dict[str, list]:
    return {"input_ids": encode_texts(tokenizer, batch["text"])}


def tokenize_documents(docs: datasets.Dataset, tokenizer: PreTrainedTokenizerFast, num_proc: int | None
                       ) -> datasets.Dataset:
    """Tokenize with ``datasets.map`` (batched; cached by fingerprint, so a second run skips the work)."""
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
    try:
        return docs.map(partial(_tokenize_batch, tokenizer=tokenizer), batched=True, batch_size=1000,
                        remove_columns=docs.column_names, features=features, num_proc=num_proc,
                        desc="Tokenizing documents")
    except UnicodeDecodeError as err:  # a non-UTF-8 (e.g. Latin-1) file is only noticed when the text is read
        raise DataError(f"dataset.data_files: a document is not UTF-8 text ({err.reason} at byte {err.start}); "
                        "re-encode the file(s) as UTF-8.") from None


def iter_token_documents(docs: Iterable[dict], tokenizer: PreTrainedTokenizerFast) -> Iterator[np.ndarray]:
    """Tokenize a stream of documents lazily, a few hundred at a time."""
    pending: list[str] = []
    for example in docs:
        pending.append(example["text"])
        if len(pending) == TOKENIZE_BATCH:
            yield from (np.asarray(ids, dtype=np.int64) for ids in encode_texts(tokenizer, pending))
            pending = []
    yield from (np.asarray(ids, dtype=np.int64) for ids in encode_texts(tokenizer, pending))


def flat_tokens(tokenized: datasets.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(all token ids back to back, start of each document, length of each document) from the Arrow column."""
    tokenized = tokenized.with_format("arrow")  # public API; a selection/shuffle is applied by the formatter
    column = tokenized[:]["input_ids"].combine_chunks()
    offsets = column.offsets.to_numpy().astype(np.int64)
    values = column.flatten().to_numpy(zero_copy_only=False)
    offsets = offsets - offsets[0]
    return values, offsets[:-1], np.diff(offsets)


__all__ = ["EMBEDDED_CORPUS", "HOLDOUT_SEED", "encode_texts", "flat_tokens", "holdout_split",
           "iter_token_documents", "load_documents", "tokenize_documents"]
