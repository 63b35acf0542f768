"""Export: the tie survives init/save/load, safetensors round trip is exact, remote code loads in a fresh process."""

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

from neobert_pt import NeoBERTForMaskedLM, NeoBERTForSequenceClassification, NeoBERTModel


def assert_tied(model: NeoBERTForMaskedLM) -> None:
    emb = model.model.embeddings.weight
    assert model.lm_head.weight is emb
    assert model.lm_head.weight.data_ptr() == emb.data_ptr()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_lm_head_is_embedding_after_init_and_training_step(make_config):
    model = NeoBERTForMaskedLM(make_config())
    assert_tied(model)
    assert sum(1 for n, _ in model.named_parameters() if "embeddings" in n or "lm_head" in n) == 1
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(1, 97, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert_tied(model)


def test_save_load_exact_and_tied(make_config, tmp_path):
    model = NeoBERTForMaskedLM(make_config()).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    stored = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in stored  # the tied decoder is not stored twice
    for name, tensor in model.state_dict().items():
        if name != "lm_head.weight":
            assert torch.equal(stored[name], tensor), name

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "neobert"
    assert config["auto_map"]["AutoConfig"] == "configuration_neobert.NeoBERTConfig"
    assert config["auto_map"]["AutoModelForMaskedLM"] == "modeling_neobert.NeoBERTForMaskedLM"
    assert (tmp_path / "modeling_neobert.py").exists() and (tmp_path / "configuration_neobert.py").exists()

    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is NeoBERTForMaskedLM
    assert_tied(loaded)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids = torch.randint(1, 97, (2, 6))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)

    encoder = AutoModel.from_pretrained(tmp_path)  # the base model loads from an MLM checkpoint
    assert type(encoder) is NeoBERTModel
    assert torch.equal(encoder.embeddings.weight, model.model.embeddings.weight)
    assert type(AutoConfig.from_pretrained(tmp_path)).__name__ == "NeoBERTConfig"


def test_sequence_classification_from_mlm_checkpoint(make_config, tmp_path):
    NeoBERTForMaskedLM(make_config()).save_pretrained(tmp_path)
    clf = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    assert type(clf) is NeoBERTForSequenceClassification
    assert clf.classifier.out_features == 3


FRESH_PROCESS = r"""
import sys, torch
torch.set_num_threads(1)  # same reduction order as the parent test process → bitwise-equal logits
from transformers import AutoModelForMaskedLM
model = AutoModelForMaskedLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert "neobert_pt" not in sys.modules, "remote code must not need neobert_pt"
assert model.lm_head.weight is model.model.embeddings.weight
batch = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(**batch).logits, sys.argv[3])
print(type(model).__module__)
"""


def test_fresh_process_loads_with_trust_remote_code(make_config, tmp_path):
    model = NeoBERTForMaskedLM(make_config()).eval()
    model.save_pretrained(tmp_path / "model")
    doc = torch.tensor([[0, 0, 0, 1, 1, -1]])
    batch = dict(
        input_ids=torch.randint(1, 97, (1, 6)),
        attention_mask=(doc >= 0).long(),
        position_ids=torch.tensor([[0, 1, 2, 0, 1, 0]]),
        document_ids=doc,
    )
    torch.save(batch, tmp_path / "batch.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            FRESH_PROCESS,
            str(tmp_path / "model"),
            str(tmp_path / "batch.pt"),
            str(tmp_path / "logits.pt"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "transformers_modules" in result.stdout  # really the copied remote code
    with torch.no_grad():
        expected = model(**batch).logits
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)
