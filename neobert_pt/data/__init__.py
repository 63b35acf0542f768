"""Data pipeline: embedded default corpus, tokenizer, packing, MLM collator and resumable loaders."""

from neobert_pt.data.errors import DataError
from neobert_pt.data.loader import StreamingTrainLoader, TrainLoader
from neobert_pt.data.pipeline import DataBundle, build_data
from neobert_pt.data.tokenizer import build_tokenizer

__all__ = ["DataBundle", "DataError", "StreamingTrainLoader", "TrainLoader", "build_data", "build_tokenizer"]
