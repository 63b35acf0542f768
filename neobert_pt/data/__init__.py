"""Data pipeline: embedded corpus, tokenizer, tokenized shards, packing, MLM collator and resumable loaders.

Importing this package does not import ``datasets``: only the sources that read text need it (lazily).
"""

from neobert_pt.data.errors import DataError
from neobert_pt.data.loader import TrainLoader
from neobert_pt.data.pipeline import DataBundle, build_data
from neobert_pt.data.tokenizer import build_tokenizer

__all__ = ["DataBundle", "DataError", "TrainLoader", "build_data", "build_tokenizer"]
