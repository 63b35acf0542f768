"""GLUE, NER and embeddings suites end to end through the CLI on small local data of the real schema."""

import json

import datasets
import numpy as np
import pytest
import yaml

from neobert_pt.evaluate.cli import main
from neobert_pt.evaluate.embeddings import SentenceEncoder, read_pairs, write_sentence_transformers_files

SMALL = dict(learning_rates=[1.0e-3], seeds=[0, 1], batch_size=8, epochs=1, warmup_ratio=0.1, weight_decay=0.0,
             max_length=32, eval_batch_size=16)


def sentences(rng, n):
    words = "the a cat dog sat ran on under mat rug red big house tree".split()
    return [" ".join(rng.choice(words, size=rng.integers(3, 8))) for _ in range(n)]


@pytest.fixture
def glue_dir(tmp_path):
    """GLUE-schema data saved with datasets: cola (single sentence), stsb (regression pairs), mnli (m / mm)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "glue"

    def split(n, **cols):
        return datasets.Dataset.from_dict({k: v(n) for k, v in cols.items()})

    datasets.DatasetDict({
        s: split(n, sentence=lambda n: sentences(rng, n), label=lambda n: rng.integers(0, 2, n).tolist())
        for s, n in (("train", 24), ("validation", 16))}).save_to_disk(root / "cola")
    datasets.DatasetDict({
        s: split(n, sentence1=lambda n: sentences(rng, n), sentence2=lambda n: sentences(rng, n),
                 label=lambda n: np.round(rng.random(n) * 5, 1).tolist())
        for s, n in (("train", 24), ("validation", 16))}).save_to_disk(root / "stsb")
    mnli = root / "mnli"
    mnli.mkdir()
    for s, n in (("train", 24), ("validation_matched", 12), ("validation_mismatched", 12)):
        rows = [{"premise": p, "hypothesis": h, "label": int(y)}
                for p, h, y in zip(sentences(rng, n), sentences(rng, n), rng.integers(0, 3, n), strict=True)]
        (mnli / f"{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_glue_suite_end_to_end(model_dir, glue_dir, tmp_path, capsys):
    recipe = tmp_path / "glue.yaml"
    recipe.write_text(yaml.safe_dump({**SMALL, "tasks": ["cola", "stsb", "mnli"]}))
    code = main([str(model_dir.parent), "--suite", "glue", "--glue-data", str(glue_dir), "--glue-recipe",
                 str(recipe), "--no-progress", "--cpu"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((model_dir / "eval_results.json").read_text())["suites"]["glue"]
    m = results["metrics"]
    for key in ("cola/matthews", "stsb/pearson", "stsb/spearman", "mnli/accuracy_m", "mnli/accuracy_mm"):
        assert -1.0 <= m[key] <= 1.0 and f"{key}_std" in m
    runs = results["tasks"]["stsb"]["runs"]
    assert [r["seed"] for r in runs] == [0, 1]
    assert m["stsb/pearson"] == pytest.approx(np.mean([r["pearson"] for r in runs]))
    assert m["stsb/pearson_std"] == pytest.approx(np.std([r["pearson"] for r in runs], ddof=1))
    assert results["recipe"]["learning_rates"] == [1.0e-3] and results["recipe"]["seeds"] == [0, 1]
    md = (model_dir / "eval_results.md").read_text()
    assert "| cola/matthews |" in md and "learning_rates" in md  # the recipe is printed into the results


def test_ner_suite_end_to_end(model_dir, tmp_path, capsys):
    data = tmp_path / "conll"
    data.mkdir()
    sent = [("john NNP B-NP B-PER", "visited VBD B-VP O", "paris NNP B-NP B-LOC", ". . O O"),
            ("mary NNP B-NP B-PER", "saw VBD B-VP O", "acme NNP B-NP B-ORG", "corp NNP I-NP I-ORG"),
            ("the DT B-NP O", "big JJ I-NP O", "cat NN I-NP O", "ran VBD B-VP O")]
    text = "-DOCSTART- -X- -X- O\n\n" + "\n\n".join("\n".join(s) for s in sent * 4) + "\n"
    for split in ("train", "validation"):
        (data / f"{split}.txt").write_text(text)
    recipe = tmp_path / "ner.yaml"
    recipe.write_text(yaml.safe_dump({**SMALL, "learning_rates": [3.0e-3], "epochs": 8}))
    code = main([str(model_dir), "--suite", "ner", "--ner-data", str(data), "--ner-recipe", str(recipe),
                 "--no-progress", "--cpu"])
    assert code == 0, capsys.readouterr().err
    block = json.loads((model_dir / "eval_results.json").read_text())["suites"]["ner"]
    assert block["labels"] == ["O", "B-LOC", "B-ORG", "B-PER", "I-ORG"]
    assert 0.0 <= block["metrics"]["f1"] <= 1.0 and "f1_std" in block["metrics"]
    assert block["metrics"]["f1"] > 0.5  # the training sentences themselves: a tagger must fit them


def test_embeddings_wrapper_and_sts_check(model_dir, tmp_path, tokenizer, capsys):
    enc = SentenceEncoder(model_dir, pooling="mean")
    from neobert_pt import NeoBERTModel

    base = NeoBERTModel.from_pretrained(model_dir).eval()
    batch = tokenizer(["the cat sat", "a big red house on the mat"], padding=True, return_tensors="pt")
    h = base(**batch).last_hidden_state.detach()
    m = batch["attention_mask"][..., None].float()
    expected = ((h * m).sum(1) / m.sum(1)).numpy()
    assert np.allclose(enc.encode(["the cat sat", "a big red house on the mat"], batch_size=1), expected, atol=1e-5)

    pairs = tmp_path / "pairs.tsv"
    rows = ["sentence1\tsentence2\tscore", "the cat sat\tthe cat sat\t5.0", "the cat sat\ta dog ran\t1.0",
            "red house\tred house on the mat\t3.5", "the tree\tthe big tree\t4.0"]
    pairs.write_text("\n".join(rows) + "\n")
    assert read_pairs(pairs)[2].tolist() == [5.0, 1.0, 3.5, 4.0]
    assert main([str(model_dir), "--suite", "embeddings", "--sts-data", str(pairs), "--no-progress", "--cpu"]) == 0
    metrics = json.loads((model_dir / "eval_results.json").read_text())["suites"]["embeddings"]["metrics"]
    assert metrics["pairs"] == 4 and -1 <= metrics["sts_spearman"] <= 1

    write_sentence_transformers_files(model_dir, pooling="mean")
    pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
    assert pooling["word_embedding_dimension"] == 32 and pooling["pooling_mode_mean_tokens"]
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(model_dir), trust_remote_code=True, device="cpu")
    assert np.allclose(model.encode(["the cat sat"]), enc.encode(["the cat sat"]), atol=1e-5)
