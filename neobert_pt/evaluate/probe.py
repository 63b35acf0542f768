"""Offline word-order probe on the embedded corpus: does the frozen encoder know what fluent text looks like?

Labels come from the corpus itself: every window of ``window`` consecutive tokens appears twice, once as written
(label 1) and once with its tokens shuffled (label 0). Both versions hold the same bag of words, so a model that
ignores order, like a randomly initialised encoder whose near-uniform attention averages tokens, sits at chance. The
features are the mean and the standard deviation over the window's token states of the last layer (frozen), and a
logistic regression (scikit-learn, standardised features) is trained on 80% of the DOCUMENTS and scored on the
other 20% (no window of a test document is seen in training). The same probe on a randomly initialised encoder of the
same architecture and seed gives the baseline; ``margin`` = accuracy - random-init accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from neobert_pt.evaluate.distributed import gather_objects, shard, world


def order_examples(
    documents: Sequence[Sequence[int]], *, window: int, max_windows: int | None, seed: int
) -> tuple[list[list[int]], np.ndarray, np.ndarray]:
    """(token windows, labels, is_test) with every chosen window once in order and once shuffled."""
    rng = np.random.default_rng(seed)
    spans = [(d, s) for d, doc in enumerate(documents) for s in range(0, len(doc) - window + 1, window)]
    if max_windows is not None and len(spans) > max_windows:
        spans = [spans[i] for i in np.sort(rng.choice(len(spans), max_windows, replace=False))]
    test_docs = set(rng.permutation(len(documents))[: max(1, len(documents) // 5)].tolist())
    rows, labels, test = [], [], []
    for d, s in spans:
        w = list(documents[d][s:s + window])
        shuffled = [w[i] for i in rng.permutation(window)]
        rows += [w, shuffled]
        labels += [1, 0]
        test += [d in test_docs] * 2
    return rows, np.asarray(labels), np.asarray(test, dtype=bool)


@torch.no_grad()
def pooled_features(model, rows: list[list[int]], *, cls_id: int, sep_id: int, batch_size: int = 64,
                    progress: bool = True, desc: str = "probe") -> np.ndarray:
    """(N, 2H) float32: mean and std over each row's token states (``[CLS]``/``[SEP]`` added, not pooled).

    ``model`` is an encoder (``NeoBERTModel``) or a whole MLM; it is called as a whole (FSDP2-safe) and the last
    entry of ``hidden_states`` (after the final norm) is pooled.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    batches = [list(range(i, min(i + batch_size, len(rows)))) for i in range(0, len(rows), batch_size)]
    mine: dict[int, np.ndarray] = {}
    rank, _ = world()
    for idx, weight in tqdm(shard(batches), desc=desc, disable=not progress or rank != 0):
        ids = torch.tensor([[cls_id, *rows[i], sep_id] for i in idx], device=device)  # equal lengths: no padding
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][:, 1:-1].float()
        feats = torch.cat([h.mean(1), h.std(1)], dim=-1).cpu().numpy()
        if weight:
            mine.update(zip(idx, feats, strict=True))
    merged: dict[int, np.ndarray] = {}
    for part in gather_objects(mine):
        merged.update(part)
    model.train(was_training)
    return np.stack([merged[i] for i in range(len(rows))])


def fit_probe(features: np.ndarray, labels: np.ndarray, is_test: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Train accuracy and held-out accuracy of a standardised logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=3000, random_state=seed))
    clf.fit(features[~is_test], labels[~is_test])
    return {"accuracy": float(clf.score(features[is_test], labels[is_test])),
            "train_accuracy": float(clf.score(features[~is_test], labels[~is_test]))}


def word_order_probe(
    model,
    documents: Sequence[Sequence[int]],
    *,
    cls_id: int,
    sep_id: int,
    window: int = 32,
    max_windows: int | None = 1500,
    seed: int = 0,
    batch_size: int = 64,
    baseline: bool = True,
    progress: bool = True,
) -> dict[str, float]:
    """Probe ``model`` (and, with ``baseline``, a random init of its config seeded with ``seed``)."""
    rows, labels, is_test = order_examples(documents, window=window, max_windows=max_windows, seed=seed)
    if not is_test.any() or is_test.all():
        raise ValueError("word-order probe: need at least two documents with a full window each")
    common = dict(cls_id=cls_id, sep_id=sep_id, batch_size=batch_size, progress=progress)
    out = fit_probe(pooled_features(model, rows, **common, desc="probe"), labels, is_test, seed)
    out.update(test_examples=float(is_test.sum()), train_examples=float((~is_test).sum()))
    if baseline:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random_model = type(model)(model.config).to(next(model.parameters()).device)
        base = fit_probe(pooled_features(random_model, rows, **common, desc="probe (random init)"), labels,
                         is_test, seed)
        out["random_init_accuracy"] = base["accuracy"]
        out["margin"] = out["accuracy"] - base["accuracy"]
    return out
