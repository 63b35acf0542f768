"""neobert_pt: pretrain NeoBERT-style encoders as Hugging Face models.

Importing the package registers the NeoBERT classes with the ``transformers`` Auto classes (``AutoConfig``,
``AutoModel``, ``AutoModelForMaskedLM``, ``AutoModelForSequenceClassification``,
``AutoModelForTokenClassification``) and marks them for remote code,
so ``save_pretrained`` writes ``auto_map`` and copies the modeling files. Kept light: no trainer import here.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from neobert_pt.modeling import (
    NeoBERTConfig,
    NeoBERTForMaskedLM,
    NeoBERTForSequenceClassification,
    NeoBERTForTokenClassification,
    NeoBERTModel,
)

AutoConfig.register(NeoBERTConfig.model_type, NeoBERTConfig, exist_ok=True)
for _auto, _model in (
    (AutoModel, NeoBERTModel),
    (AutoModelForMaskedLM, NeoBERTForMaskedLM),
    (AutoModelForSequenceClassification, NeoBERTForSequenceClassification),
    (AutoModelForTokenClassification, NeoBERTForTokenClassification),
):
    _auto.register(NeoBERTConfig, _model, exist_ok=True)
    _model.register_for_auto_class(_auto.__name__)
NeoBERTConfig.register_for_auto_class()

__all__ = [
    "NeoBERTConfig",
    "NeoBERTModel",
    "NeoBERTForMaskedLM",
    "NeoBERTForSequenceClassification",
    "NeoBERTForTokenClassification",
]
