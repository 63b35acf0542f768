"""NeoBERT model configuration.

Imports only ``transformers`` (plus stdlib) so that ``save_pretrained`` can ship this file as remote code.
"""

from __future__ import annotations

import importlib.util
import logging
import math

from transformers import PreTrainedConfig

logger = logging.getLogger(__name__)

HIDDEN_ACTS = ("swiglu", "gelu")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2", "varlen", "flex_attention")


def swiglu_inner_size(intermediate_size: int) -> int:
    """SwiGLU width: 2/3 of the nominal FFN width rounded up to a multiple of 8 (3072 → 2048).

    Three SwiGLU matrices of width 2/3·I cost the same FLOPs and parameters as two GELU matrices of width I.
    """
    return 8 * math.ceil(2 * intermediate_size / 3 / 8)


def choose_attn_implementation(*, cuda: bool, flash_attn: bool, torch_varlen: bool, flex: bool,
                               half_precision: bool = True, torch_version: str = "") -> tuple[str, str]:
    """(backend, why) that ``'auto'`` picks given what is available: the fastest exact backend.

    CUDA: ``flash_attention_2`` when flash-attn is installed, else ``varlen`` when this torch has
    ``torch.nn.attention.varlen.varlen_attn``: both run a flash kernel on the unpadded token stream split at
    document boundaries (no padding FLOPs, no mask); flash-attn first because installing it is an explicit choice.
    Both kernels take bf16/fp16 only, so without ``half_precision`` (fp32 training) they are passed over. Else
    ``flex_attention`` (compiled, block-sparse document mask: partly padded blocks are still computed). CPU:
    ``sdpa`` (torch's varlen kernel is CUDA-only and flex runs unfused there). The order is by construction; the
    backends are not yet measured against each other on a GPU (``benchmarks/gpu_suite.py`` measures them).
    """
    torch_name = f"torch {torch_version}".strip()
    if not cuda:
        return "sdpa", "no CUDA device (torch's varlen kernel is CUDA-only, flex_attention is unfused on CPU)"
    if half_precision and flash_attn:
        return "flash_attention_2", "CUDA with flash-attn installed (varlen kernel on the unpadded token stream)"
    if half_precision and torch_varlen:
        return "varlen", f"CUDA without flash-attn; {torch_name} has varlen_attn (kernel on the unpadded token stream)"
    if not half_precision and (flash_attn or torch_varlen):
        why = "CUDA in fp32: the varlen flash kernels take bf16/fp16 only, so compiled flex_attention"
    else:
        why = f"CUDA without flash-attn; {torch_name} has no varlen_attn: compiled flex_attention"
    if flex:
        return "flex_attention", why + " with a document block mask"
    return "sdpa", f"CUDA without a usable varlen kernel; {torch_name} has no flex_attention"


def resolve_attn_implementation(name: str, half_precision: bool = True) -> str:
    """Turn ``'auto'`` into :func:`choose_attn_implementation`'s pick here, logged as one line with the reason.

    ``half_precision``: whether the model will run in bf16/fp16 on CUDA. The trainer passes its
    ``trainer.mixed_precision``; a bare ``NeoBERTConfig(attn_implementation="auto")`` assumes it (the way the flash
    kernels are used on GPUs; an fp32 forward on them raises an error naming the fix)."""
    if name != "auto":
        return name
    import torch

    def has(module: str, attr: str) -> bool:
        return importlib.util.find_spec(module) is not None and hasattr(importlib.import_module(module), attr)

    choice, why = choose_attn_implementation(
        cuda=torch.cuda.is_available(),
        flash_attn=importlib.util.find_spec("flash_attn") is not None,
        torch_varlen=has("torch.nn.attention.varlen", "varlen_attn"),
        flex=has("torch.nn.attention.flex_attention", "flex_attention"),
        half_precision=half_precision,
        torch_version=torch.__version__,
    )
    logger.info("NeoBERT attn_implementation 'auto' resolved to '%s': %s", choice, why)
    return choice


def _check_choice(prefix: str, name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{prefix}{name}={value!r} is not supported; allowed: {', '.join(allowed)}")


def check_architecture(
    *,
    hidden_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    intermediate_size: int,
    hidden_act: str,
    dropout: float,
    attn_implementation: str | None,
    prefix: str = "NeoBERTConfig.",
) -> None:
    """The checks of a NeoBERT architecture, shared by :class:`NeoBERTConfig` and the run config's ``model`` section
    (``neobert_pt/config/schema.py``, ``prefix="model."``). Raises ``ValueError`` naming ``{prefix}<key>``, the
    value and the fix."""
    for name, value in (("hidden_size", hidden_size), ("num_hidden_layers", num_hidden_layers),
                        ("num_attention_heads", num_attention_heads), ("intermediate_size", intermediate_size)):
        if value < 1:
            raise ValueError(f"{prefix}{name} must be >= 1, got {value}.")
    _check_choice(prefix, "hidden_act", hidden_act, HIDDEN_ACTS)
    if attn_implementation is not None:
        _check_choice(prefix, "attn_implementation", attn_implementation, ATTN_IMPLEMENTATIONS)
    if hidden_size % num_attention_heads != 0:
        raise ValueError(
            f"{prefix}hidden_size ({hidden_size}) must be divisible by {prefix}num_attention_heads "
            f"({num_attention_heads}); change one of them."
        )
    if (hidden_size // num_attention_heads) % 2 != 0:
        raise ValueError(
            f"{prefix}hidden_size / {prefix}num_attention_heads = {hidden_size // num_attention_heads} (the head dim) "
            "must be even for RoPE; change one of them."
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{prefix}dropout={dropout} must be in [0, 1).")


class NeoBERTConfig(PreTrainedConfig):
    r"""Configuration of a NeoBERT encoder (pre-norm, RMSNorm, SwiGLU, RoPE, fused QKV, no biases, tied embeddings).

    The defaults reproduce the NeoBERT **100M recipe** (hidden 768, 12 layers, 12 heads, SwiGLU inner width 2048,
    4096 positions); the 250M recipe is the same with ``num_hidden_layers=28``. Every field of
    ``neobert_pt.config.schema.ModelConfig`` that describes the architecture is an argument here with the same name
    and meaning: this signature holds the defaults and :func:`check_architecture` the checks of both, and the
    trainer builds the model config with ``ModelConfig.neobert_config(vocab_size=..., pad_token_id=...)``.

    Args:
        vocab_size (`int`, defaults to 30522): rows of the token embedding (= columns of the tied MLM decoder);
            ``None`` means the default.
        hidden_size (`int`, defaults to 768): width of the residual stream.
        num_hidden_layers (`int`, defaults to 12): number of encoder blocks.
        num_attention_heads (`int`, defaults to 12): heads per block; must divide ``hidden_size``.
        intermediate_size (`int`, defaults to 3072): nominal FFN width. With ``hidden_act="swiglu"`` the actual
            width is 2/3 of it rounded up to a multiple of 8 (2048) so FLOPs match a GELU FFN of this width.
        max_position_embeddings (`int`, defaults to 4096): longest sequence the model is meant for (RoPE itself has
            no table, the value documents the trained context).
        norm_eps (`float`, defaults to 1e-5): epsilon of the RMSNorm / LayerNorm layers.
        rope_theta (`float`, defaults to 10000.0): rotary embedding base θ.
        hidden_act (`str`, defaults to ``"swiglu"``): FFN activation, ``"swiglu"`` or ``"gelu"``.
        rms_norm (`bool`, defaults to True): RMSNorm (True) or bias-free LayerNorm (False) for every norm.
        dropout (`float`, defaults to 0.0): residual dropout, applied in training mode to the attention block's
            output and to the FFN output before each is added to the residual stream (``NeoBERTLayer``); attention
            probabilities are never dropped. NeoBERT pretrains without dropout.
        tie_word_embeddings (`bool`, defaults to True): the MLM decoder IS the token embedding matrix.
        initializer_range (`float`, defaults to 0.02): std of the normal init of linear and embedding weights.
        attn_implementation (`str`, defaults to ``"sdpa"``): ``"sdpa"``, ``"eager"`` (supports
            ``output_attentions``), ``"flash_attention_2"`` (flash-attn varlen, CUDA + flash-attn), ``"varlen"``
            (torch's ``varlen_attn``, CUDA + bf16/fp16; an exact masked reference elsewhere), ``"flex_attention"``
            (block-sparse document mask; compiled on CUDA) or ``"auto"`` (on CUDA flash_attention_2 with flash-attn,
            else varlen when torch has it, else flex_attention; sdpa on CPU; the choice and the reason are logged
            once). The two varlen backends unpad once per forward and run the layers on the real tokens only.
        masked_logits_only (`bool`, defaults to True): when labels are given, run the MLM decoder only on the
            positions with a label (same loss, far less compute); ``logits`` is then ``(num_masked, vocab)``.
        pad_token_id (`int`, defaults to 0): id of the padding token (its embedding row starts at zero).
        classifier_dropout (`float`, *optional*): dropout of the sequence-classification head; ``None`` uses
            ``dropout``.
        classifier_activation (`str`, defaults to ``"tanh"``): activation between the head's dense and classifier
            layers (any key of ``transformers.activations.ACT2FN``).
        num_labels / id2label / label2id / problem_type: classification settings handled by ``PreTrainedConfig``.

    Example:
        >>> from neobert_pt import NeoBERTConfig, NeoBERTForMaskedLM
        >>> model = NeoBERTForMaskedLM(NeoBERTConfig(num_hidden_layers=28))  # the 250M recipe
    """

    model_type = "neobert"

    def __init__(
        self,
        vocab_size: int | None = 30522,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        max_position_embeddings: int = 4096,
        norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        hidden_act: str = "swiglu",
        rms_norm: bool = True,
        dropout: float = 0.0,
        tie_word_embeddings: bool = True,
        initializer_range: float = 0.02,
        attn_implementation: str | None = "sdpa",
        masked_logits_only: bool = True,
        pad_token_id: int | None = 0,
        classifier_dropout: float | None = None,
        classifier_activation: str = "tanh",
        **kwargs,
    ) -> None:
        check_architecture(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                           num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                           hidden_act=hidden_act, dropout=dropout, attn_implementation=attn_implementation)
        if attn_implementation is not None:
            attn_implementation = resolve_attn_implementation(attn_implementation)
        self.vocab_size = 30522 if vocab_size is None else vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.norm_eps = norm_eps
        self.rope_theta = float(rope_theta)
        self.hidden_act = hidden_act
        self.rms_norm = rms_norm
        self.dropout = dropout
        self.initializer_range = initializer_range
        self.masked_logits_only = masked_logits_only
        self.classifier_dropout = classifier_dropout
        self.classifier_activation = classifier_activation
        self.pad_token_id = pad_token_id
        self.tie_word_embeddings = tie_word_embeddings
        super().__init__(attn_implementation=attn_implementation, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ffn_inner_size(self) -> int:
        """Width of the FFN hidden layer actually built (SwiGLU shrinks it, see ``swiglu_inner_size``)."""
        if self.hidden_act == "swiglu":
            return swiglu_inner_size(self.intermediate_size)
        return self.intermediate_size


__all__ = ["NeoBERTConfig"]
