"""Token classification (CoNLL-2003-style NER) with ``NeoBERTForTokenClassification`` and entity-level F1.

Data: ``--ner-data DIR`` with CoNLL files (``DIR/train.txt``, ``DIR/validation.txt``, optional ``DIR/test.txt``: one
``word ... TAG`` line per token, the tag in the last column, blank lines between sentences, ``-DOCSTART-`` skipped)
or the Hub dataset of the recipe (``tokens`` / ``ner_tags`` columns). Words are split into sub-words; the first
sub-word of each word is trained and predicted, the rest get -100. Word tags are then scored as exact entity spans
(micro precision / recall / F1, seqeval's default mode).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from neobert_pt.evaluate.errors import EvalError
from neobert_pt.evaluate.finetune import assign_runs, load_recipe, mean_std, predict, train
from neobert_pt.evaluate.metrics import entity_f1

DEFAULT_RECIPE = Path(__file__).resolve().parents[2] / "configs" / "evaluation" / "ner.yaml"
SPLITS = ("train", "validation", "test")


def read_conll(path: Path) -> list[tuple[list[str], list[str]]]:
    """(words, tags) per sentence of a CoNLL file (tag = last column)."""
    sentences, words, tags = [], [], []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts or parts[0] == "-DOCSTART-":
            if words:
                sentences.append((words, tags))
            words, tags = [], []
            continue
        if len(parts) < 2:
            raise EvalError(f"{path}:{n}: expected 'word ... TAG', got {line!r}")
        words.append(parts[0])
        tags.append(parts[-1])
    if words:
        sentences.append((words, tags))
    return sentences


def load_ner(data_dir: Path | None, dataset: str) -> dict[str, list[tuple[list[str], list[str]]]]:
    if data_dir is not None:
        found = {s: read_conll(data_dir / f"{s}.txt") for s in SPLITS if (data_dir / f"{s}.txt").is_file()}
        if "train" not in found or "validation" not in found:
            raise EvalError(f"--ner-data {data_dir}: expected CoNLL files train.txt and validation.txt (test.txt "
                            "optional): one 'word ... TAG' line per token, blank line between sentences")
        return found
    from neobert_pt.evaluate.data import load_splits

    splits = load_splits(dataset, None, None, "--ner-data")
    names = splits["train"].features["ner_tags"].feature.names
    return {s: [(list(r["tokens"]), [names[t] for t in r["ner_tags"]]) for r in splits[s]]
            for s in SPLITS if s in splits}


def encode(sentences, tokenizer, label_ids: dict[str, int], max_length: int) -> list[dict[str, Any]]:
    """Sub-word ids with the word tag on each word's first sub-word (-100 elsewhere) and the word index map."""
    enc = tokenizer([w for w, _ in sentences], is_split_into_words=True, truncation=True, max_length=max_length)
    rows = []
    for i, (_, tags) in enumerate(sentences):
        word_ids = enc.word_ids(i)
        labels, first, seen = [], [], set()
        for pos, w in enumerate(word_ids):
            if w is None or w in seen:
                labels.append(-100)
                continue
            seen.add(w)
            first.append(pos)
            labels.append(label_ids[tags[w]])
        rows.append({"input_ids": enc["input_ids"][i], "labels": labels, "first": first, "n_words": len(tags)})
    return rows


def run_ner(model_dir: Path, tokenizer, *, recipe_path: Path | None = None, data_dir: Path | None = None,
            device=None, progress: bool = True) -> dict[str, Any]:
    import torch

    from neobert_pt.modeling import NeoBERTForTokenClassification

    recipe, raw = load_recipe(recipe_path, DEFAULT_RECIPE)
    data = load_ner(data_dir, recipe.dataset or "eriktks/conll2003")
    tags = sorted({t for sents in data.values() for _, ts in sents for t in ts}, key=lambda t: (t != "O", t))
    label_ids = {t: i for i, t in enumerate(tags)}
    limits = {"train": recipe.max_train_examples}
    rows = {s: encode(sents[: limits.get(s, recipe.max_eval_examples)], tokenizer, label_ids, recipe.max_length)
            for s, sents in data.items()}
    gold = {s: [ts for _, ts in sents[: limits.get(s, recipe.max_eval_examples)]] for s, sents in data.items()}
    device = device or torch.device("cpu")

    def one_run(run: tuple[float, int]) -> dict[str, float]:
        lr, seed = run
        torch.manual_seed(seed)
        model = NeoBERTForTokenClassification.from_pretrained(
            model_dir, num_labels=len(tags), id2label=dict(enumerate(tags)), label2id=label_ids)
        train(model, rows["train"], recipe, lr=lr, seed=seed, pad_id=tokenizer.pad_token_id, label_pad=-100,
              device=device, progress=progress, desc=f"ner lr={lr:g} seed={seed}")
        out = {}
        for split in [s for s in ("validation", "test") if s in rows]:
            logits = predict(model, rows[split], batch_size=recipe.eval_batch_size, pad_id=tokenizer.pad_token_id,
                             device=device)
            pred = []
            for r, lg in zip(rows[split], logits, strict=True):
                words = [tags[int(lg[p].argmax())] for p in r["first"]]
                pred.append(words + ["O"] * (r["n_words"] - len(words)))  # words cut by max_length predict O
            scores = entity_f1(pred, gold[split])
            suffix = "" if split == "validation" else "_test"
            out.update({f"{k}{suffix}": v for k, v in scores.items()})
        return out

    runs = [(lr, seed) for lr in recipe.learning_rates for seed in recipe.seeds]
    results = assign_runs(runs, one_run)
    by_lr = {lr: [r for (lr_, _), r in zip(runs, results, strict=True) if lr_ == lr] for lr in recipe.learning_rates}
    best = max(by_lr, key=lambda lr: mean_std([r["f1"] for r in by_lr[lr]])[0])
    metrics: dict[str, float] = {}
    for key in by_lr[best][0]:
        mean, std = mean_std([r[key] for r in by_lr[best]])
        metrics[key], metrics[f"{key}_std"] = mean, std
    return {"metrics": metrics, "recipe": {**asdict(recipe), **raw}, "labels": tags, "best_lr": best,
            "runs": [{"lr": lr, "seed": s, **r} for (lr, s), r in zip(runs, results, strict=True)]}
