"""The run config's ``model`` section derives from NeoBERTConfig: one place for defaults and checks, and
``model.dropout`` does what its doc says (residual dropout in training, nothing in eval)."""

from __future__ import annotations

import inspect
from dataclasses import fields

import pytest
import torch

from neobert_pt.config.errors import ConfigError
from neobert_pt.config.schema import TRAINING_ONLY_MODEL_KEYS, ModelConfig
from neobert_pt.modeling import NeoBERTConfig, NeoBERTForMaskedLM

# NeoBERTConfig arguments the run config does not expose: the tokenizer gives pad_token_id, and the classification
# heads are configured by the fine-tuning code (neobert_pt/evaluate/).
NOT_IN_THE_SECTION = {"pad_token_id", "classifier_dropout", "classifier_activation", "kwargs"}


def test_every_architecture_key_is_a_neobert_argument_with_its_default():
    params = inspect.signature(NeoBERTConfig.__init__).parameters
    section = {f.name for f in fields(ModelConfig)}
    architecture = section - set(TRAINING_ONLY_MODEL_KEYS)
    assert architecture == set(params) - {"self", "vocab_size"} - NOT_IN_THE_SECTION
    default = ModelConfig()
    for name in architecture:
        assert getattr(default, name) == params[name].default, name
    assert default.vocab_size is None  # the run config's own default: the tokenizer's size


@pytest.mark.parametrize(("overrides", "section_message", "model_message"), [
    ({"hidden_size": 30, "num_attention_heads": 4},
     "model.hidden_size (30) must be divisible by model.num_attention_heads (4); change one of them.",
     "NeoBERTConfig.hidden_size (30) must be divisible by NeoBERTConfig.num_attention_heads (4)"),
    ({"hidden_size": 36, "num_attention_heads": 4}, "(the head dim) must be even for RoPE", "must be even for RoPE"),
    ({"dropout": 1.0}, "model.dropout=1.0 must be in [0, 1).", "NeoBERTConfig.dropout=1.0 must be in [0, 1)."),
    ({"num_hidden_layers": 0}, "model.num_hidden_layers must be >= 1, got 0.",
     "NeoBERTConfig.num_hidden_layers must be >= 1, got 0."),
])
def test_the_section_and_the_model_run_the_same_checks(overrides, section_message, model_message):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**overrides)
    assert section_message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match=None) as err:
        NeoBERTConfig(**overrides)
    assert model_message in str(err.value)


def _tiny(dropout: float) -> NeoBERTForMaskedLM:
    torch.manual_seed(0)
    section = ModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          dropout=dropout)
    return NeoBERTForMaskedLM(section.neobert_config(vocab_size=50))


def test_model_dropout_is_residual_dropout_in_training_only():
    ids = torch.randint(1, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    model = _tiny(0.5)
    model.train()
    first, second = (model(input_ids=ids).logits for _ in range(2))
    assert not torch.equal(first, second)  # dropped differently on each forward
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
        plain = _tiny(0.0).eval()(input_ids=ids).logits
    assert torch.equal(model(input_ids=ids).logits.detach(), plain)  # same init: eval ignores the dropout
    assert [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)] == [0.5, 0.5]  # one per block
