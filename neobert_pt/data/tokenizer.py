"""Tokenizer construction: the shipped BERT WordPiece vocab, a Hub/local tokenizer, or one trained on the corpus."""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from neobert_pt.config.schema import RunConfig
from neobert_pt.data.errors import DataError

EMBEDDED_DIR = Path(__file__).with_name("embedded")
EMBEDDED_VOCAB = EMBEDDED_DIR / "vocab.txt"
EMBEDDED_CORPUS = EMBEDDED_DIR / "corpus.jsonl.gz"
SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                  "mask_token": "[MASK]"}


def build_tokenizer(run: RunConfig) -> PreTrainedTokenizerFast:
    """The tokenizer named by ``run.tokenizer.name``; never truncates or pads on its own (packing owns lengths)."""
    name = run.tokenizer.name
    max_len = run.dataset.max_seq_length
    if name == "embedded":
        tok = _wordpiece_tokenizer(models.WordPiece.from_file(str(EMBEDDED_VOCAB), unk_token="[UNK]"),
                                   run.tokenizer.lowercase)
        return _wrap(tok, max_len)
    if name == "train":
        return _wrap(_train_wordpiece(run), max_len)
    return _from_pretrained(name, max_len)


def _wordpiece_tokenizer(model: models.WordPiece, lowercase: bool) -> Tokenizer:
    """BERT's pipeline: clean + (lower-case) normalizer, whitespace/punctuation split, WordPiece, [CLS] x [SEP]."""
    tok = Tokenizer(model)
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    if tok.get_vocab_size() > 0:  # an untrained model gets its post-processor after training
        _set_post_processor(tok)
    return tok


def _set_post_processor(tok: Tokenizer) -> None:
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )


def _wrap(tok: Tokenizer, max_len: int) -> PreTrainedTokenizerFast:
    tok.no_truncation()
    tok.no_padding()
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_len, **SPECIAL_TOKENS)


def _train_wordpiece(run: RunConfig) -> Tokenizer:
    """Train a WordPiece vocab on the training documents, or reuse the one trained before on the same inputs.

    The ``tokenizers`` trainer breaks frequency ties in hash-map order, so two trainings on the same text give
    slightly different vocabularies. The first result is therefore cached (keyed by the data and settings) and
    reused, which keeps ids stable across restarts and resumes on this machine. Special tokens come first:
    [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4.
    """
    path = trained_tokenizer_path(run)
    if path.exists():
        return Tokenizer.from_file(str(path))
    from neobert_pt.data.sources import iter_training_texts  # local import: sources is the heavier module

    tok = _wordpiece_tokenizer(models.WordPiece(unk_token="[UNK]"), run.tokenizer.lowercase)
    trainer = trainers.WordPieceTrainer(
        vocab_size=run.tokenizer.vocab_size,
        special_tokens=list(SPECIAL_TOKENS[k] for k in ("pad_token", "unk_token", "cls_token", "sep_token",
                                                        "mask_token")),
        show_progress=False,
    )
    texts: Iterator[str] = iter_training_texts(run)
    tok.train_from_iterator(texts, trainer=trainer)
    _set_post_processor(tok)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, path)  # atomic: a concurrent reader sees no file or the whole file
    return tok


def trained_tokenizer_path(run: RunConfig) -> Path:
    """Cache file of the tokenizer trained for this run's data and tokenizer settings."""
    ds = run.dataset
    files = sorted(f for pattern in ds.data_files or [] for f in glob.glob(os.path.expanduser(pattern)))
    if ds.name == "embedded":
        files = [str(EMBEDDED_CORPUS)]
    key = {
        "name": ds.name, "config_name": ds.config_name, "split": ds.split, "text_column": ds.text_column,
        "max_documents": ds.max_documents, "vocab_size": run.tokenizer.vocab_size,
        "lowercase": run.tokenizer.lowercase, "files": [(f, os.path.getsize(f), os.path.getmtime(f)) for f in files],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    if ds.cache_dir:
        root = Path(ds.cache_dir)
    else:
        import datasets  # local import: only a trained tokenizer needs the datasets cache location

        root = Path(datasets.config.HF_DATASETS_CACHE)
    return root / "neobert_pt_tokenizers" / digest / "tokenizer.json"


def _from_pretrained(name: str, max_len: int) -> PreTrainedTokenizerFast:
    if name.startswith(("/", "./", "../", "~")) and not os.path.exists(os.path.expanduser(name)):
        raise DataError(f"tokenizer.name '{name}' is not an existing directory (and not 'embedded' or 'train').")
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or _looks_offline(err)
        where = "a local directory" if os.path.isdir(name) else "a Hub tokenizer"
        reason = "offline (HF_HUB_OFFLINE is set or the Hub is unreachable) and not in the local cache" if offline \
            else f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise DataError(f"tokenizer.name '{name}' ({where}) could not be loaded: {reason}.") from err
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise DataError(f"tokenizer.name '{name}' has no fast (tokenizers) backend; neobert_pt needs one.")
    missing = [attr for attr in ("mask_token", "pad_token") if getattr(tok, attr) is None]
    if missing:
        raise DataError(f"tokenizer.name '{name}' has no {' / '.join(missing)}; an MLM tokenizer needs both.")
    tok.model_max_length = max_len
    tok.backend_tokenizer.no_truncation()
    tok.backend_tokenizer.no_padding()
    return tok


def encode_texts(tokenizer: PreTrainedTokenizerFast, texts: Iterable[str | None]) -> list[list[int]]:
    """``[CLS] ids [SEP]`` per non-empty text; empty texts are dropped (a document of no tokens is not data)."""
    texts = [t for t in texts if t]
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    return [[cls, *enc.ids, sep] for enc in encodings]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    """A short hash of the tokenizer's full serialization (vocab, normalizer, pre-tokenizer, specials).

    Two tokenizers with the same fingerprint turn the same text into the same ids; tokenized shards record it.
    """
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def _looks_offline(err: BaseException) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    return any(word in text for word in ("offline", "connection", "resolve", "timed out", "network"))
