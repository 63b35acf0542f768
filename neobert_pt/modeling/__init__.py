"""NeoBERT as Hugging Face models (config, encoder, MLM and sequence-classification heads)."""

from neobert_pt.modeling.configuration_neobert import NeoBERTConfig
from neobert_pt.modeling.modeling_neobert import (
    NeoBERTForMaskedLM,
    NeoBERTForSequenceClassification,
    NeoBERTModel,
    NeoBERTPreTrainedModel,
)

__all__ = [
    "NeoBERTConfig",
    "NeoBERTModel",
    "NeoBERTForMaskedLM",
    "NeoBERTForSequenceClassification",
    "NeoBERTPreTrainedModel",
]
