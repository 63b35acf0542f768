"""Downstream evaluation of NeoBERT encoders: ``python -m neobert_pt.evaluate MODEL_OR_RUN_DIR --suite ...``.

Suites (docs/evaluation.md): ``probe`` (offline word-order probe on the embedded corpus), ``pppl`` (exact
pseudo-perplexity, bucketed by length), ``glue`` (fine-tuning, mean ± std over seeds), ``ner`` (CoNLL-style token
classification, entity F1), ``embeddings`` (pooling wrapper, offline STS check, MTEB when installed).
Nothing here is imported by the model or the trainer until a suite is asked for.
"""

from neobert_pt.evaluate.errors import EvalError

SUITES = ("probe", "pppl", "glue", "ner", "embeddings")
CHEAP_SUITES = ("probe", "pppl")  # the ones the trainer can run at checkpoints

__all__ = ["CHEAP_SUITES", "SUITES", "EvalError"]
