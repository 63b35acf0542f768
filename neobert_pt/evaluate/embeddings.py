"""Sentence embeddings: a pooling wrapper, the sentence-transformers folder layout, an offline STS check, MTEB.

``SentenceEncoder`` pools the encoder's last hidden states (``mean`` over real tokens, or the ``cls`` token) and has
the ``encode(sentences, batch_size=..., normalize_embeddings=...)`` call that sentence-transformers and MTEB use.
``write_sentence_transformers_files`` adds ``modules.json`` / ``1_Pooling`` so that
``SentenceTransformer(model_dir, trust_remote_code=True)`` builds the same Transformer → Pooling pipeline.
The offline STS check scores local pairs (``sentence1``, ``sentence2``, ``score`` or ``label``; STS-B schema) by the
Spearman / Pearson correlation between cosine similarity and the gold score, with no fine-tuning.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neobert_pt.evaluate import metrics as M
from neobert_pt.evaluate.errors import EvalError

POOLINGS = ("mean", "cls")


class SentenceEncoder:
    """Frozen NeoBERT + pooling; ``encode`` returns an (N, H) float32 array."""

    def __init__(self, model_dir: str | Path, tokenizer=None, *, pooling: str = "mean", max_length: int = 512,
                 device: str | torch.device | None = None) -> None:
        from transformers import AutoTokenizer

        from neobert_pt.modeling import NeoBERTModel

        if pooling not in POOLINGS:
            raise EvalError(f"pooling '{pooling}' is not one of {', '.join(POOLINGS)}")
        self.model = NeoBERTModel.from_pretrained(model_dir).to(device or "cpu").eval()
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_dir)
        self.pooling, self.max_length = pooling, max_length

    @torch.no_grad()
    def encode(self, sentences: list[str], batch_size: int = 32, normalize_embeddings: bool = False,
               **_: Any) -> np.ndarray:
        device = next(self.model.parameters()).device
        out = []
        for s in range(0, len(sentences), batch_size):
            enc = self.tokenizer(list(sentences[s:s + batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            mask = enc["attention_mask"].to(device)
            h = self.model(input_ids=enc["input_ids"].to(device), attention_mask=mask).last_hidden_state.float()
            if self.pooling == "cls":
                pooled = h[:, 0]
            else:
                m = mask[..., None].float()
                pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)
            if normalize_embeddings:
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
            out.append(pooled.cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.config.hidden_size), dtype=np.float32)


def write_sentence_transformers_files(model_dir: str | Path, pooling: str = "mean", max_length: int = 512) -> None:
    """The sentence-transformers folder layout (Transformer module at the root, then Pooling)."""
    model_dir = Path(model_dir)
    hidden = json.loads((model_dir / "config.json").read_text())["hidden_size"]
    (model_dir / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ], indent=2))
    (model_dir / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_length,
                                                                     "do_lower_case": False}, indent=2))
    (model_dir / "1_Pooling").mkdir(exist_ok=True)
    (model_dir / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": hidden, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}, indent=2))


def read_pairs(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """(sentence1, sentence2, gold score) from a .jsonl/.csv/.tsv file or a ``save_to_disk`` split folder."""
    import datasets

    path = Path(path)
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
    elif path.is_file():
        ext = path.suffix.lower()
        builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv"}.get(ext)
        if builder is None:
            raise EvalError(f"--sts-data {path}: expected .jsonl, .csv, .tsv or a save_to_disk folder")
        ds = datasets.load_dataset(builder, data_files=str(path), split="train",
                                   **({"delimiter": "\t"} if ext == ".tsv" else {}))
    else:
        raise EvalError(f"--sts-data {path} does not exist")
    score = "score" if "score" in ds.column_names else "label"
    missing = [c for c in ("sentence1", "sentence2", score) if c not in ds.column_names]
    if missing:
        raise EvalError(f"--sts-data {path}: missing column(s) {', '.join(missing)} (need sentence1, sentence2, "
                        "score or label)")
    return list(ds["sentence1"]), list(ds["sentence2"]), np.asarray(ds[score], dtype=np.float64)


def sts_check(encoder: SentenceEncoder, a: list[str], b: list[str], gold: np.ndarray,
              batch_size: int = 32) -> dict[str, float]:
    ea = encoder.encode(a, batch_size=batch_size, normalize_embeddings=True)
    eb = encoder.encode(b, batch_size=batch_size, normalize_embeddings=True)
    cosine = (ea * eb).sum(-1)
    return {"sts_spearman": M.spearman(cosine, gold), "sts_pearson": M.pearson(cosine, gold), "pairs": float(len(a))}


def run_mteb(encoder: SentenceEncoder, tasks: list[str], output_dir: Path) -> dict[str, float]:
    try:
        import mteb
    except ImportError as err:
        raise EvalError("MTEB tasks were asked for but the mteb package is not installed: pip install "
                        "'neobert_pt[mteb]' (or drop --mteb-tasks)") from err
    results = mteb.MTEB(tasks=mteb.get_tasks(tasks=tasks)).run(encoder, output_folder=str(output_dir / "mteb"))
    return {f"mteb/{r.task_name}": float(r.get_score()) for r in results}


def run_embeddings(model_dir: Path, tokenizer, *, sts_path: Path | None = None, glue_dir: Path | None = None,
                   pooling: str = "mean", mteb_tasks: list[str] | None = None, batch_size: int = 32,
                   device=None, output_dir: Path | None = None) -> dict[str, Any]:
    if sts_path is None and glue_dir is not None and (glue_dir / "stsb").exists():
        sts_path = glue_dir / "stsb" / "validation"  # a save_to_disk DatasetDict keeps each split in a folder
        if not sts_path.exists():
            sts_path = next((p for p in (glue_dir / "stsb").glob("validation.*")), sts_path)
    if sts_path is None and not mteb_tasks:
        raise EvalError("the embeddings suite needs --sts-data FILE (sentence1, sentence2, score) or --glue-data DIR "
                        "with stsb/, and/or --mteb-tasks")
    encoder = SentenceEncoder(model_dir, tokenizer, pooling=pooling, device=device)
    metrics: dict[str, float] = {}
    if sts_path is not None:
        metrics.update(sts_check(encoder, *read_pairs(sts_path), batch_size=batch_size))
    if mteb_tasks:
        metrics.update(run_mteb(encoder, mteb_tasks, Path(output_dir or model_dir)))
    return {"metrics": metrics, "settings": {"pooling": pooling, "sts_data": str(sts_path) if sts_path else None,
                                             "similarity": "cosine", "mteb_tasks": mteb_tasks or []}}
