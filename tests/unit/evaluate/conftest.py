"""A tiny NeoBERT (hidden 32) with a word-level tokenizer, saved like the trainer's final/ directory."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

import neobert_pt  # noqa: F401  (registers the Auto classes)
from neobert_pt import NeoBERTConfig, NeoBERTForMaskedLM

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ("the a cat dog sat ran on under mat rug red big small house tree john mary paris london berlin "
         "acme corp visited saw likes and , . is was good bad film great terrible movie").split()


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_config():
    return NeoBERTConfig(vocab_size=len(SPECIALS) + len(WORDS), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64, max_position_embeddings=64, pad_token_id=0)


@pytest.fixture
def model_dir(tmp_path, tiny_config):
    """``run/final`` with model + tokenizer, as the trainer leaves it."""
    torch.manual_seed(0)
    final = tmp_path / "run" / "final"
    NeoBERTForMaskedLM(tiny_config).save_pretrained(final)
    make_tokenizer().save_pretrained(final)
    return final
