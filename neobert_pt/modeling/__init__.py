"""NeoBERT as Hugging Face models (config, encoder, MLM, sequence- and token-classification heads)."""

from neobert_pt.modeling.configuration_neobert import NeoBERTConfig
from neobert_pt.modeling.modeling_neobert import (
    NeoBERTForMaskedLM,
    NeoBERTForSequenceClassification,
    NeoBERTForTokenClassification,
    NeoBERTModel,
    NeoBERTPreTrainedModel,
)

__all__ = [
    "NeoBERTConfig",
    "NeoBERTModel",
    "NeoBERTForMaskedLM",
    "NeoBERTForSequenceClassification",
    "NeoBERTForTokenClassification",
    "NeoBERTPreTrainedModel",
]
