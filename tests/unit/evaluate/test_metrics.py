"""Metric code against scikit-learn, scipy and seqeval on fixed inputs (ties, several classes, IOB1 and IOB2)."""

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from neobert_pt.evaluate import metrics


@pytest.fixture
def labels():
    rng = np.random.default_rng(7)
    gold = rng.integers(0, 2, 200)
    pred = np.where(rng.random(200) < 0.7, gold, 1 - gold)
    return pred, gold


def test_classification_metrics_match_sklearn(labels):
    pred, gold = labels
    assert metrics.accuracy(pred, gold) == pytest.approx(skm.accuracy_score(gold, pred), abs=1e-12)
    assert metrics.f1_binary(pred, gold) == pytest.approx(skm.f1_score(gold, pred), abs=1e-12)
    assert metrics.matthews(pred, gold) == pytest.approx(skm.matthews_corrcoef(gold, pred), abs=1e-12)
    three_gold = np.random.default_rng(1).integers(0, 3, 150)
    three_pred = np.where(np.arange(150) % 3 == 0, (three_gold + 1) % 3, three_gold)
    assert metrics.matthews(three_pred, three_gold) == pytest.approx(
        skm.matthews_corrcoef(three_gold, three_pred), abs=1e-12)
    assert metrics.matthews([1, 1, 1], [1, 1, 1]) == skm.matthews_corrcoef([1, 1, 1], [1, 1, 1]) == 0.0


def test_correlations_match_scipy_with_ties():
    rng = np.random.default_rng(3)
    x = np.round(rng.random(300) * 5, 1)  # many ties, like STS-B gold scores
    y = x + rng.normal(0, 1, 300)
    assert metrics.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert metrics.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    assert np.array_equal(metrics.average_ranks(x), stats.rankdata(x))


def test_entity_f1_matches_seqeval():
    seqeval = pytest.importorskip("seqeval.metrics")
    gold = [["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "O"], ["I-ORG", "I-ORG", "O", "B-MISC"],
            ["O", "B-PER", "B-PER", "I-PER", "O", "I-LOC"]]
    pred = [["B-PER", "I-PER", "O", "B-LOC", "O", "O"], ["I-ORG", "B-ORG", "O", "B-MISC"],
            ["O", "B-PER", "I-PER", "I-PER", "O", "I-LOC"]]
    ours = metrics.entity_f1(pred, gold)
    assert ours["precision"] == pytest.approx(seqeval.precision_score(gold, pred))
    assert ours["recall"] == pytest.approx(seqeval.recall_score(gold, pred))
    assert ours["f1"] == pytest.approx(seqeval.f1_score(gold, pred))
    assert 0 < ours["f1"] < 1
    assert metrics.entity_spans(["I-ORG", "I-ORG", "B-ORG", "I-PER"]) == {("ORG", 0, 1), ("ORG", 2, 2), ("PER", 3, 3)}
