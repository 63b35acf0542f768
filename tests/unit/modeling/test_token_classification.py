"""NeoBERTForTokenClassification: loss, Auto registration, and the remote-code export of a fine-tuned checkpoint."""

import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
from transformers import AutoModelForTokenClassification

from neobert_pt import NeoBERTForMaskedLM, NeoBERTForTokenClassification


def test_token_classification_loss_and_masking(make_config):
    model = NeoBERTForTokenClassification(make_config(num_labels=5)).eval()
    ids = torch.randint(1, 97, (2, 7))
    labels = torch.randint(0, 5, (2, 7))
    labels[:, 0] = -100  # [CLS] and sub-word continuations are ignored
    labels[1, 4:] = -100
    out = model(input_ids=ids, labels=labels)
    assert out.logits.shape == (2, 7, 5)
    keep = labels != -100
    assert torch.allclose(out.loss, F.cross_entropy(out.logits[keep], labels[keep]))


def test_auto_class_from_mlm_checkpoint_and_remote_code(make_config, tmp_path):
    NeoBERTForMaskedLM(make_config()).save_pretrained(tmp_path / "mlm")
    auto_map = json.loads((tmp_path / "mlm" / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForTokenClassification"] == "modeling_neobert.NeoBERTForTokenClassification"

    tagger = AutoModelForTokenClassification.from_pretrained(tmp_path / "mlm", num_labels=3).eval()
    assert type(tagger) is NeoBERTForTokenClassification and tagger.classifier.out_features == 3
    tagger.save_pretrained(tmp_path / "tagger")
    ids = torch.randint(1, 97, (1, 6))
    torch.save(ids, tmp_path / "ids.pt")
    script = (
        "import sys, torch\n"
        "torch.set_num_threads(1)\n"
        "from transformers import AutoModelForTokenClassification\n"
        "m = AutoModelForTokenClassification.from_pretrained(sys.argv[1], trust_remote_code=True).eval()\n"
        "assert 'neobert_pt' not in sys.modules\n"
        "with torch.no_grad():\n"
        "    torch.save(m(input_ids=torch.load(sys.argv[2])).logits, sys.argv[3])\n"
        "print(type(m).__module__)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "tagger"), str(tmp_path / "ids.pt"), str(tmp_path / "o.pt")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "transformers_modules" in result.stdout
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "o.pt"), tagger(input_ids=ids).logits)
