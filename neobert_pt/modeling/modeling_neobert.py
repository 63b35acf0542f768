"""NeoBERT as Hugging Face models: a pre-norm encoder with RMSNorm, SwiGLU, RoPE, fused QKV and no biases.

References: NeoBERT (Le Breton et al., 2025, arXiv:2502.19587); RoPE (Su et al., 2021); SwiGLU (Shazeer, 2020).

Reads top to bottom: norms and rotary helpers → packing layout (masks / varlen metadata, built once per forward) →
the QK-logit statistic (QK-clip's measurement) → attention backends (plain functions in one dict) → attention → MLP →
layer → PreTrainedModel → base model → heads.

Packed rows: ``document_ids (B, T)`` gives each token's document index within its row (-1 = padding).
Attention is block-diagonal per document, so a packed row's outputs equal each document run alone (positions
restart at 0 per document through ``position_ids``). This file imports only torch, transformers and its sibling
configuration module so that ``save_pretrained`` can ship it as remote code.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    MaskedLMOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.utils import logging

from .configuration_neobert import NeoBERTConfig

logger = logging.get_logger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Norms and rotary embedding
# ----------------------------------------------------------------------------------------------------------------


class NeoBERTRMSNorm(nn.Module):
    """RMSNorm with a learned gain, computed in fp32 (bf16 mean-of-squares loses too many bits)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x).to(dtype)


def build_norm(config: NeoBERTConfig) -> nn.Module:
    if config.rms_norm:
        return NeoBERTRMSNorm(config.hidden_size, eps=config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=False)


def rope_inv_freq(config: NeoBERTConfig, device: torch.device | None = None) -> torch.Tensor:
    """θ^(-2i/d) for i in [0, d/2): the rotation speed of each channel pair."""
    d = config.head_dim
    return 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))


class NeoBERTRotaryEmbedding(nn.Module):
    """cos/sin tables computed from ``position_ids`` on the fly (positions restart per packed document)."""

    def __init__(self, config: NeoBERTConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids (B, T) → freqs (B, T, d/2) → fp32 cos, sin (B, 1, T, d), broadcast over heads
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + d/2) of ``x (B, nH, T, d)`` by the position angle, in fp32 (bf16 angles at
    positions in the thousands are off by whole radians), returned in ``x``'s dtype."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Packing layout: which query may attend which key, built ONCE per forward and shared by every layer
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class NeoBERTAttentionLayout:
    """Per-forward attention structure.

    ``mask``: (B, 1, T, T) bool for sdpa/eager, True = may attend; padding queries attend only to themselves so
    no softmax row is empty (their outputs are irrelevant but finite). None = every pair allowed (fast path).
    ``document_ids``: (B, T) long, the document index of each token (-1 = padding), or None when every pair is
    allowed; the QK-logit statistic derives its allowed pairs from it chunk by chunk (no dense mask is kept for it).
    ``indices``/``cu_seqlens``/``max_seqlen``: varlen metadata for ``flash_attention_2`` / ``varlen`` (flat index
    of every real token in the (B*T) grid, cumulative document lengths, longest document).
    ``unpadded``: the layers run on the unpadded stream: the model gathers the real tokens ONCE into a
    (1, total_tokens, H) "row" before the first layer and re-pads ONCE after the final norm (:func:`unpad` /
    :func:`repad`), so q/k/v reach the varlen kernel already flat. False on the varlen path only when the layers
    measure QK logits (``output_qk_logits``, QK-clip): the layers then keep the (B, T) grid (the measurement is per
    row, its logit tile stays (T, T) rather than (total_tokens, total_tokens)) and the backend gathers and scatters
    q/k/v around the kernel with the same ``indices``.
    ``padded_shape``: (B, T) of the grid the stream came from (for :func:`repad`).
    ``block_mask``: flex_attention's block-sparse document mask (no dense (T, T) mask is kept).
    """

    mask: torch.Tensor | None = None
    document_ids: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    unpadded: bool = False
    padded_shape: tuple[int, int] = (0, 0)
    block_mask: object | None = None


def combine_document_ids(
    attention_mask: torch.Tensor | None, document_ids: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """One (B, T) long tensor of document indices (-1 = pad), or None when every row is one unpadded document."""
    if document_ids is None and attention_mask is None:
        return None
    if document_ids is None:
        if bool(attention_mask.all()):  # host sync, once per forward: lets unpadded batches skip masks entirely
            return None
        return torch.where(attention_mask.bool(), 0, -1).long()
    document_ids = document_ids.to(device=device, dtype=torch.long)
    if attention_mask is not None:
        document_ids = document_ids.masked_fill(~attention_mask.bool(), -1)
    return document_ids


def positions_from_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its document (restarts at 0 where the document index changes)."""
    _, t = document_ids.shape
    idx = torch.arange(t, device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


def varlen_sizes(document_ids: torch.Tensor) -> tuple[int, int, int]:
    """(real tokens, documents, longest document) of a (B, T) ``document_ids`` batch: computed by the caller on
    the HOST (e.g. the trainer, before the batch moves), it lets the varlen path build its metadata without a
    device->host sync."""
    counts = _document_lengths(document_ids)
    return int(counts.sum()), int(counts.numel()), int(counts.max()) if counts.numel() else 0


def _row_major_document_ids(document_ids: torch.Tensor) -> torch.Tensor:
    """A unique id per (row, document), flattened: real tokens in row-major order form the varlen sequence."""
    b, t = document_ids.shape
    return (document_ids + torch.arange(b, device=document_ids.device)[:, None] * (t + 1)).flatten()


def _document_lengths(document_ids: torch.Tensor) -> torch.Tensor:
    flat = _row_major_document_ids(document_ids)
    _, counts = torch.unique_consecutive(flat[(document_ids >= 0).flatten()], return_counts=True)
    return counts


def _varlen_metadata(document_ids: torch.Tensor, layout: NeoBERTAttentionLayout,
                     sizes: tuple[int, int, int] | None) -> None:
    """indices / cu_seqlens / max_seqlen. With host ``sizes`` every op has a known output size (no sync);
    without them the lengths are read back from the device (three syncs per forward)."""
    real = (document_ids >= 0).flatten()
    if sizes is None:
        layout.indices = real.nonzero().squeeze(-1)
        counts = _document_lengths(document_ids)
        layout.cu_seqlens = F.pad(counts.cumsum(0, dtype=torch.int32), (1, 0))
        layout.max_seqlen = int(counts.max()) if counts.numel() else 0
        return
    num_tokens, num_docs, layout.max_seqlen = sizes
    layout.indices = torch.nonzero_static(real, size=num_tokens).squeeze(-1)
    flat = _row_major_document_ids(document_ids).index_select(0, layout.indices)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    first = torch.nonzero_static(starts, size=num_docs).squeeze(-1).to(torch.int32)
    layout.cu_seqlens = torch.cat([first, first.new_full((1,), num_tokens)])


def flex_attention_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def _document_block_mask(document_ids: torch.Tensor) -> object:
    """flex_attention's block mask: query and key in the same document, key not padding (built once per forward;
    padding queries attend nothing and flex returns zeros for them)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_document(b, h, q, kv):
        return (document_ids[b, q] == document_ids[b, kv]) & (document_ids[b, kv] >= 0)

    b, t = document_ids.shape
    return create_block_mask(same_document, b, None, t, t, device=document_ids.device)


# Backends whose kernel takes the unpadded stream split by cu_seqlens.
VARLEN_IMPLEMENTATIONS = ("flash_attention_2", "varlen")


def build_layout(document_ids: torch.Tensor | None, implementation: str, keep_grid: bool = False,
                 sizes: tuple[int, int, int] | None = None) -> NeoBERTAttentionLayout:
    """Masks / varlen metadata for one forward. Documents must be contiguous within a row (the packer's layout).

    ``keep_grid``: the layers keep the (B, T) grid on the varlen backends too (``layout.unpadded`` False), as the
    per-row QK-logit measurement needs."""
    layout = NeoBERTAttentionLayout(document_ids=document_ids)
    if document_ids is None:
        return layout
    real = document_ids >= 0  # (B, T)
    sparse = implementation in (*VARLEN_IMPLEMENTATIONS, "flex_attention")  # no dense mask for the kernel
    if implementation in VARLEN_IMPLEMENTATIONS:
        _varlen_metadata(document_ids, layout, sizes)
        layout.unpadded = not keep_grid
        layout.padded_shape = (document_ids.shape[0], document_ids.shape[1])
    if implementation == "flex_attention":
        layout.block_mask = _document_block_mask(document_ids)
    if sparse:
        return layout
    # (B, T, T): same document and a real key
    allowed = (document_ids[:, :, None] == document_ids[:, None, :]) & real[:, None, :]
    eye = torch.eye(document_ids.shape[1], dtype=torch.bool, device=document_ids.device)
    layout.mask = (allowed | (eye & ~real[:, :, None]))[:, None]
    return layout


def unpad(x: torch.Tensor, layout: NeoBERTAttentionLayout) -> torch.Tensor:
    """(B, T, ...) → (1, total_tokens, ...): the real tokens in row-major order, one "row" for the layers."""
    return x.flatten(0, 1).index_select(0, layout.indices)[None]


def repad(x: torch.Tensor, layout: NeoBERTAttentionLayout) -> torch.Tensor:
    """(1, total_tokens, ...) → (B, T, ...), zeros at padding: the inverse of :func:`unpad`."""
    b, t = layout.padded_shape
    full = x.new_zeros(b * t, *x.shape[2:]).index_copy(0, layout.indices, x[0])
    return full.view(b, t, *x.shape[2:])


# ----------------------------------------------------------------------------------------------------------------
# QK-logit statistic: per row and head, the largest pre-softmax logit over the pairs that may attend (QK-clip)
# ----------------------------------------------------------------------------------------------------------------

# Upper bound on the elements of one (B, nH, chunk, T) logit tile: 2**25 fp32 = 128 MiB.
QK_LOGIT_CHUNK_ELEMENTS = 2**25


@torch.compiler.disable  # a measurement beside the attention: kept out of compiled blocks (no graph growth)
@torch.no_grad()
def max_qk_logit_per_row(
    query: torch.Tensor,
    key: torch.Tensor,
    document_ids: torch.Tensor | None,
    *,
    scale: float,
    chunk_elements: int = QK_LOGIT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """(B, nH) fp32: per row and head, the max of ``scale · q·kᵀ`` over allowed (query, key) pairs; ``-inf`` for a
    row with none.

    ``query, key: (B, nH, T, d)`` after RoPE. A pair is allowed when both tokens are real (``document_ids ≥ 0``) and
    in the same document; ``document_ids`` None allows every pair. Queries are processed in chunks, so neither the
    logit tile nor its mask tile ever exceeds ``chunk_elements`` elements and no (B, 1, T, T) mask is built; the
    result does not depend on the chunk size (a max is exact). Computed in fp32 whatever the input dtype.
    """
    b, nh, t, _ = query.shape
    q, k_t = query.float(), key.float().transpose(-1, -2)  # k_t (B, nH, d, T)
    chunk = max(1, min(t, chunk_elements // max(1, b * nh * t)))
    best = torch.full((b, nh), float("-inf"), dtype=torch.float32, device=q.device)
    for start in range(0, t, chunk):
        logits = torch.matmul(q[:, :, start : start + chunk], k_t) * scale  # (B, nH, c, T)
        if document_ids is not None:
            rows = document_ids[:, start : start + chunk, None]  # (B, c, 1)
            allowed = (rows == document_ids[:, None, :]) & (rows >= 0) & (document_ids[:, None, :] >= 0)  # (B, c, T)
            logits = torch.where(allowed[:, None], logits, float("-inf"))
        best = torch.maximum(best, logits.amax(dim=(-1, -2)))
    return best


# ----------------------------------------------------------------------------------------------------------------
# Attention backends: f(module, q, k, v, layout, *, dropout, scale, output_attentions) -> ((B, T, nH, d), weights)
# q, k, v are (B, nH, T, d), RoPE applied.
# ----------------------------------------------------------------------------------------------------------------


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: NeoBERTAttentionLayout,
    *,
    dropout: float,
    scale: float,
    output_attentions: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale  # (B, nH, T, T)
    if layout.mask is not None:
        scores = scores.masked_fill(~layout.mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    probs = F.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(probs, value).transpose(1, 2)
    return out, (weights if output_attentions else None)


def sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: NeoBERTAttentionLayout,
    *,
    dropout: float,
    scale: float,
    output_attentions: bool = False,
) -> tuple[torch.Tensor, None]:
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=layout.mask, dropout_p=dropout if module.training else 0.0, scale=scale
    )
    return out.transpose(1, 2), None


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def _find_torch_varlen() -> Callable[..., torch.Tensor] | None:
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return None
    return getattr(importlib.import_module("torch.nn.attention.varlen"), "varlen_attn", None)


# Looked up once at import, not inside the (possibly compiled) attention call: no import machinery or signature
# inspection for dynamo to trace, so a compiled block stays one graph.
_TORCH_VARLEN = _find_torch_varlen()
# torch 2.10's varlen_attn has no ``scale`` argument (it applies 1/sqrt(d)); later versions take one
_TORCH_VARLEN_TAKES_SCALE = _TORCH_VARLEN is not None and "scale" in inspect.signature(_TORCH_VARLEN).parameters


def torch_varlen_available() -> bool:
    """Whether this torch has ``torch.nn.attention.varlen.varlen_attn`` (its kernel is CUDA-only)."""
    return _TORCH_VARLEN is not None


def varlen_reference(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor, scale: float
) -> torch.Tensor:
    """Exact varlen attention in plain torch, any device: full attention inside each [cu[i], cu[i+1]) segment of
    the (N, nH, d) stream, as one masked sdpa over the stream (O(N²) memory: a reference, not a fast path)."""
    n = query.shape[0]
    # segment of every stream position, on the device (no host read of cu_seqlens)
    seg = torch.searchsorted(cu_seqlens[1:], torch.arange(n, device=query.device, dtype=cu_seqlens.dtype),
                             right=True)
    mask = seg[:, None] == seg[None, :]  # (N, N)
    q, k, v = (x.transpose(0, 1) for x in (query, key, value))  # (nH, N, d)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(0, 1)


def _flash_attn_kernel(q, k, v, layout: NeoBERTAttentionLayout, scale: float, dropout: float) -> torch.Tensor:
    if not flash_attn_available():
        raise ImportError(
            "attn_implementation='flash_attention_2' needs CUDA and flash-attn: pip install 'neobert_pt[flash]' "
            "(or use 'sdpa')"
        )
    flash_attn = importlib.import_module("flash_attn")  # by name: remote-code loading must not require it
    if layout.cu_seqlens is None:  # (B, T, nH, d): no padding, one document per row
        return flash_attn.flash_attn_func(q, k, v, dropout_p=dropout, softmax_scale=scale, causal=False)
    return flash_attn.flash_attn_varlen_func(
        q, k, v, cu_seqlens_q=layout.cu_seqlens, cu_seqlens_k=layout.cu_seqlens, max_seqlen_q=layout.max_seqlen,
        max_seqlen_k=layout.max_seqlen, dropout_p=dropout, softmax_scale=scale, causal=False,
    )


def _torch_varlen_kernel(q, k, v, layout: NeoBERTAttentionLayout, scale: float, dropout: float) -> torch.Tensor:
    if not torch_varlen_available():
        raise ImportError(
            f"attn_implementation='varlen' needs torch.nn.attention.varlen.varlen_attn, which torch {torch.__version__} "
            "does not have: upgrade torch, or use 'flex_attention' / 'sdpa'"
        )
    if dropout > 0.0:
        raise ValueError("attn_implementation='varlen' has no attention dropout (torch's varlen_attn takes none)")
    if layout.cu_seqlens is None:  # (B, T, nH, d): no padding, one document per row → sdpa's own flash kernel
        out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), scale=scale)
        return out.transpose(1, 2)
    if q.device.type != "cuda":
        logger.warning_once(
            f"attn_implementation='varlen': torch's varlen kernel is CUDA-only; on {q.device.type} the exact masked "
            "reference runs instead (O(tokens²) memory; use 'sdpa' there)"
        )
        return varlen_reference(q, k, v, layout.cu_seqlens, scale)
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"attn_implementation='varlen' runs torch's flash kernel, which needs bf16/fp16 q/k/v, got {q.dtype}: "
            "set trainer.mixed_precision: bf16 (or use 'sdpa' / 'flex_attention')"
        )
    cu, longest = layout.cu_seqlens, layout.max_seqlen
    if _TORCH_VARLEN_TAKES_SCALE:
        return _TORCH_VARLEN(q, k, v, cu, cu, longest, longest, scale=scale)
    q = q * (scale * q.shape[-1] ** 0.5)  # the kernel applies 1/sqrt(d): fold the ratio to ``scale`` into q
    return _TORCH_VARLEN(q, k, v, cu, cu, longest, longest)


_VARLEN_KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    "flash_attention_2": _flash_attn_kernel,
    "varlen": _torch_varlen_kernel,
}


def varlen_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: NeoBERTAttentionLayout,
    *,
    dropout: float,
    scale: float,
    output_attentions: bool = False,
) -> tuple[torch.Tensor, None]:
    """The shared varlen plumbing. ``layout.unpadded``: q/k/v are already the (1, nH, N, d) stream and go straight
    to the kernel as (N, nH, d); otherwise the real tokens of the (B, T) grid are gathered around the kernel and
    scattered back (QK-measuring forwards); without packing metadata the kernel sees the dense (B, T, nH, d)."""
    kernel = _VARLEN_KERNELS[module.config._attn_implementation]
    p = dropout if module.training else 0.0
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (B, T, nH, d)
    b, t, h, d = q.shape
    if layout.cu_seqlens is None:
        return kernel(q, k, v, layout, scale, p), None
    if layout.unpadded:  # b == 1, t == N
        out = kernel(*(x.reshape(t, h, d) for x in (q, k, v)), layout, scale, p)
        return out.view(1, t, h, d), None
    flat = [x.reshape(b * t, h, d).index_select(0, layout.indices) for x in (q, k, v)]  # (N, nH, d)
    out = kernel(*flat, layout, scale, p)
    full = out.new_zeros(b * t, h, d).index_copy(0, layout.indices, out)
    return full.view(b, t, h, d), None


_COMPILED_FLEX: list[Callable[..., torch.Tensor]] = []


def _flex_kernel(device: torch.device) -> Callable[..., torch.Tensor]:
    """flex_attention compiled into its fused kernel on CUDA; on CPU the eager (exact, unfused) implementation."""
    from torch.nn.attention.flex_attention import flex_attention as flex

    if device.type != "cuda":
        return flex
    if not _COMPILED_FLEX:
        _COMPILED_FLEX.append(torch.compile(flex, dynamic=False))
    return _COMPILED_FLEX[0]


def flex_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: NeoBERTAttentionLayout,
    *,
    dropout: float,
    scale: float,
    output_attentions: bool = False,
) -> tuple[torch.Tensor, None]:
    """Document-aware attention from a block-sparse mask: blocks no document pair shares are skipped."""
    if not flex_attention_available():
        raise ImportError("attn_implementation='flex_attention' needs torch.nn.attention.flex_attention (or use 'sdpa')")
    out = _flex_kernel(query.device)(query, key, value, block_mask=layout.block_mask, scale=scale)
    return out.transpose(1, 2), None


NEOBERT_ATTENTION_FUNCTIONS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor | None]]] = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
    "flash_attention_2": varlen_attention,
    "varlen": varlen_attention,
    "flex_attention": flex_attention,
}


# ----------------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------------


class NeoBERTAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection.

    ``qkv.weight`` rows are ``[Q heads | K heads | V heads]``, each head ``head_dim`` consecutive rows, so QK-clip
    can scale one head's W_q / W_k rows in place.
    """

    def __init__(self, config: NeoBERTConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        layout: NeoBERTAttentionLayout,
        output_attentions: bool = False,
        output_qk_logits: bool = False,
        measure_qk_logits: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``(output (B, T, H), attention weights or None, qk_logits (B, nH) or None)``.

        ``output_qk_logits``: also return :func:`max_qk_logit_per_row` of this forward's q and k (after RoPE).
        ``measure_qk_logits``: compute q, k and that statistic only and return ``(None, None, qk_logits)``: the
        attention itself is skipped (QK-clip's post-update measurement).
        """
        b, t, _ = hidden_states.shape
        # (B, T, 3H) → (B, T, 3, nH, d) → three (B, nH, T, d)
        qkv = self.qkv(hidden_states).view(b, t, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        cos, sin = rotary
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        qk_logits = None
        if output_qk_logits or measure_qk_logits:
            if layout.unpadded:
                raise ValueError("NeoBERTAttention: QK logits are measured per row and need the (B, T) grid; build the "
                                 "layout with output_qk_logits=True (NeoBERTModel.layer_inputs / forward)")
            qk_logits = max_qk_logit_per_row(query, key, layout.document_ids, scale=self.scale)
            if measure_qk_logits:
                return None, None, qk_logits
        implementation = "eager" if output_attentions else self.config._attn_implementation
        attn_fn = NEOBERT_ATTENTION_FUNCTIONS[implementation]
        out, weights = attn_fn(
            self, query, key, value, layout, dropout=0.0, scale=self.scale, output_attentions=output_attentions
        )
        return self.out_proj(out.reshape(b, t, -1)), weights, qk_logits


class NeoBERTMLP(nn.Module):
    """SwiGLU ``down(silu(gate(x)) * up(x))`` or GELU ``down(gelu(up(x)))``; no biases."""

    def __init__(self, config: NeoBERTConfig) -> None:
        super().__init__()
        self.swiglu = config.hidden_act == "swiglu"
        inner = config.ffn_inner_size
        if self.swiglu:
            self.gate_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.down_proj = nn.Linear(inner, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x)))


class NeoBERTLayer(GradientCheckpointingLayer):
    """Pre-norm block: ``x + drop(attn(norm(x)))`` then ``x + drop(ffn(norm(x)))``."""

    def __init__(self, config: NeoBERTConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention_norm = build_norm(config)
        self.attention = NeoBERTAttention(config, layer_idx)
        self.ffn_norm = build_norm(config)
        self.ffn = NeoBERTMLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        layout: NeoBERTAttentionLayout,
        output_attentions: bool = False,
        output_qk_logits: bool = False,
        measure_qk_logits: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``(hidden_states (B, T, H), attention weights or None, qk_logits (B, nH) or None)``.

        ``qk_logits`` (with ``output_qk_logits``): per row and head, this layer's max pre-softmax logit over allowed
        pairs (:func:`max_qk_logit_per_row`). ``measure_qk_logits``: return ``(None, None, qk_logits)`` as soon as
        q and k are measured, without the attention or the MLP. Call the layer as a module (``layer(...)``) so that
        wrappers' hooks run (FSDP2 gathers the layer's parameters around the call).
        """
        attn_out, weights, qk_logits = self.attention(
            self.attention_norm(hidden_states), rotary, layout, output_attentions,
            output_qk_logits=output_qk_logits, measure_qk_logits=measure_qk_logits,
        )
        if measure_qk_logits:
            return None, None, qk_logits
        hidden_states = hidden_states + self.dropout(attn_out)
        hidden_states = hidden_states + self.dropout(self.ffn(self.ffn_norm(hidden_states)))
        return hidden_states, weights, qk_logits


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class NeoBERTModelOutput(BaseModelOutput):
    """``BaseModelOutput`` plus ``qk_logits``: with ``output_qk_logits=True``, one ``(B, nH)`` fp32 tensor per layer,
    each row's and head's max pre-softmax logit ``q·k/√d`` (after RoPE) over the pairs that may attend (same
    document, no padding); ``-inf`` for a row without any. QK-clip's logging statistic."""

    qk_logits: tuple[torch.Tensor, ...] | None = None


@dataclass
class NeoBERTMaskedLMOutput(MaskedLMOutput):
    """``MaskedLMOutput`` plus ``qk_logits`` (see :class:`NeoBERTModelOutput`)."""

    qk_logits: tuple[torch.Tensor, ...] | None = None


_AUTO_MAP = {
    "AutoModel": "NeoBERTModel",
    "AutoModelForMaskedLM": "NeoBERTForMaskedLM",
    "AutoModelForSequenceClassification": "NeoBERTForSequenceClassification",
    "AutoModelForTokenClassification": "NeoBERTForTokenClassification",
}


class NeoBERTPreTrainedModel(PreTrainedModel):
    config_class = NeoBERTConfig
    config: NeoBERTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["NeoBERTLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True

    def __init__(self, config: NeoBERTConfig, *inputs, **kwargs) -> None:
        super().__init__(config, *inputs, **kwargs)
        if self._auto_class is not None:
            # Every saved checkpoint can be opened by every NeoBERT Auto model class, not just the one it was saved as.
            auto_map = dict(getattr(config, "auto_map", None) or {})
            for auto_class, cls_name in _AUTO_MAP.items():
                auto_map.setdefault(auto_class, f"modeling_neobert.{cls_name}")
            config.auto_map = auto_map

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        """Accept NeoBERT's own ``'varlen'`` backend (dispatched by NEOBERT_ATTENTION_FUNCTIONS, not transformers'
        global attention registry); everything else is validated by transformers as usual."""
        if requested_attention == "varlen":
            return requested_attention
        return super().get_correct_attn_implementation(requested_attention, is_init_check)

    def enable_activation_checkpointing(self, checkpoint_kwargs: dict | None = None) -> None:
        """Recompute each NeoBERTLayer in the backward pass (``checkpoint_kwargs`` go to torch's checkpoint).

        transformers renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` after 5.17 (the
        old name is a deprecated alias there, to be removed in v6); this calls whichever the installed version has.
        """
        enable = getattr(self, "activation_checkpointing_enable", None) or self.gradient_checkpointing_enable
        enable(checkpoint_kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, initializer_range) for every matrix, ones for norm gains, zeros for biases and the pad row."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, (NeoBERTRMSNorm, nn.LayerNorm)):
            init.ones_(module.weight)
        elif isinstance(module, NeoBERTRotaryEmbedding):
            init.copy_(module.inv_freq, rope_inv_freq(module.config, module.inv_freq.device))


class NeoBERTModel(NeoBERTPreTrainedModel):
    """The encoder: token embedding → ``num_hidden_layers`` pre-norm blocks → final norm."""

    def __init__(self, config: NeoBERTConfig) -> None:
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.rotary_emb = NeoBERTRotaryEmbedding(config)
        self.layers = nn.ModuleList([NeoBERTLayer(config, i) for i in range(config.num_hidden_layers)])
        self.final_norm = build_norm(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def _embed_and_layout(
        self, input_ids, attention_mask, position_ids, document_ids, inputs_embeds, varlen_sizes, output_attentions,
        keep_grid: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, NeoBERTAttentionLayout]:
        """The embedded (B, T, H) grid, its position ids and the layout every layer shares."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("NeoBERTModel: pass exactly one of input_ids or inputs_embeds")
        hidden_states = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = hidden_states.shape[:2]
        document_ids = combine_document_ids(attention_mask, document_ids, hidden_states.device)
        if position_ids is None:
            if document_ids is None:
                position_ids = torch.arange(t, device=hidden_states.device).expand(b, t)
            else:
                position_ids = positions_from_documents(document_ids)
        implementation = "eager" if output_attentions else self.config._attn_implementation
        layout = build_layout(document_ids, implementation, keep_grid=keep_grid, sizes=varlen_sizes)
        return hidden_states, position_ids, layout

    def layer_inputs(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        varlen_sizes: tuple[int, int, int] | None = None,
        output_attentions: bool = False,
        output_qk_logits: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], NeoBERTAttentionLayout]:
        """What ``forward`` hands the first layer: ``(hidden_states, rotary, layout)``.

        Every layer takes ``layer(hidden_states, rotary, layout, ...)`` with the same ``rotary`` and ``layout``, and
        its first output is the next layer's ``hidden_states``. ``output_qk_logits``: the layers will be asked for
        QK logits (the layout keeps the (B, T) grid). ``forward`` and QK-clip's replay both start here (the replay
        passes ``inputs_embeds`` it embedded itself, see neobert_pt/optim/qk_clip.py).
        """
        hidden_states, position_ids, layout = self._embed_and_layout(
            input_ids, attention_mask, position_ids, document_ids, inputs_embeds, varlen_sizes, output_attentions,
            keep_grid=output_qk_logits,
        )
        if layout.unpadded:
            hidden_states, position_ids = unpad(hidden_states, layout), unpad(position_ids, layout)
        return hidden_states, self.rotary_emb(position_ids), layout

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        varlen_sizes: tuple[int, int, int] | None = None,
        output_qk_logits: bool = False,
        **kwargs,
    ) -> NeoBERTModelOutput | tuple:
        """``varlen_sizes``: optional host-computed (real tokens, documents, longest document), see
        :func:`varlen_sizes`; with it the varlen backends build their metadata without a device sync. On those
        backends padding positions of ``last_hidden_state`` / ``hidden_states`` are zeros (never computed).
        ``output_qk_logits``: also return each layer's per-row, per-head max pre-softmax logit (``qk_logits``, see
        :class:`NeoBERTModelOutput`), measured on this forward's own q and k (the layers keep the (B, T) grid)."""
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        # varlen backends: unpadded ONCE here, the layers run on the (1, total_tokens, H) stream, re-padded ONCE below
        hidden_states, rotary, layout = self.layer_inputs(
            input_ids, attention_mask, position_ids, document_ids, inputs_embeds, varlen_sizes, output_attentions,
            output_qk_logits,
        )

        def padded(x: torch.Tensor) -> torch.Tensor:
            return repad(x, layout) if layout.unpadded else x

        all_hidden = (padded(hidden_states),) if output_hidden_states else None

        all_attn = () if output_attentions else None
        all_qk = () if output_qk_logits else None
        for layer in self.layers:
            hidden_states, weights, qk_logits = layer(
                hidden_states, rotary, layout, output_attentions, output_qk_logits=output_qk_logits
            )
            if output_hidden_states:
                all_hidden += (padded(hidden_states),)
            if output_attentions:
                all_attn += (weights,)
            if output_qk_logits:
                all_qk += (qk_logits,)
        hidden_states = padded(self.final_norm(hidden_states))
        if output_hidden_states:
            all_hidden = all_hidden[:-1] + (hidden_states,)

        if not return_dict:
            return tuple(v for v in (hidden_states, all_hidden, all_attn, all_qk) if v is not None)
        return NeoBERTModelOutput(
            last_hidden_state=hidden_states, hidden_states=all_hidden, attentions=all_attn, qk_logits=all_qk
        )


class NeoBERTForMaskedLM(NeoBERTPreTrainedModel):
    """Encoder + a bias-free decoder that IS the token embedding (declared tie, re-tied on load)."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: NeoBERTConfig) -> None:
        super().__init__(config)
        self.model = NeoBERTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        masked_positions: torch.Tensor | None = None,
        varlen_sizes: tuple[int, int, int] | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        output_qk_logits: bool = False,
        **kwargs,
    ) -> NeoBERTMaskedLMOutput | tuple:
        """MLM forward. Loss = sum of token CE / ``num_items_in_batch`` when given, else the mean over labels.

        With ``config.masked_logits_only`` and labels, ``logits`` is ``(num_masked, V)`` in the order of
        ``labels.flatten() != -100``; otherwise ``(B, T, V)``. ``masked_positions`` (optional) are those flat
        indices, ascending, computed on the host (the collator does): selecting with them needs no device->host sync,
        where the boolean selection must read the number of masked tokens back from the device.
        ``output_qk_logits``: also return the encoder's ``qk_logits`` (see :class:`NeoBERTModelOutput`).
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            document_ids=document_ids,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            varlen_sizes=varlen_sizes,
            output_qk_logits=output_qk_logits,
        )
        hidden = outputs.last_hidden_state  # (B, T, H)
        loss = None
        if labels is not None and self.config.masked_logits_only:
            flat_labels = labels.flatten()
            if masked_positions is None:
                masked_positions = (flat_labels != -100).nonzero().squeeze(-1)  # device->host sync (the count)
            masked_positions = masked_positions.to(hidden.device)
            logits = self.lm_head(hidden.flatten(0, 1).index_select(0, masked_positions))  # (N, V)
            targets = flat_labels.index_select(0, masked_positions)
        else:
            logits = self.lm_head(hidden)  # (B, T, V)
            targets = None if labels is None else labels.flatten()
        if labels is not None:
            token_loss_sum = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), targets, ignore_index=-100, reduction="sum"
            )
            if num_items_in_batch is None:
                num_items_in_batch = (targets != -100).sum().clamp(min=1)
            loss = token_loss_sum / num_items_in_batch

        if not return_dict:
            rest = (logits, outputs.hidden_states, outputs.attentions, outputs.qk_logits)
            return tuple(v for v in ((loss,) if loss is not None else ()) + rest if v is not None)
        return NeoBERTMaskedLMOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions,
            qk_logits=outputs.qk_logits,
        )


class NeoBERTForSequenceClassification(NeoBERTPreTrainedModel):
    """First-token pooling → dropout → dense → activation → dropout → classifier (the BERT pooler recipe)."""

    def __init__(self, config: NeoBERTConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = NeoBERTModel(config)
        p = config.dropout if config.classifier_dropout is None else config.classifier_dropout
        self.dropout = nn.Dropout(p)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = ACT2FN[config.classifier_activation]
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput | tuple:
        """Loss follows HF: MSE for regression (num_labels == 1), CE for single-label, BCE-with-logits for
        multi-label; ``config.problem_type`` is inferred from ``labels`` when unset."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            document_ids=document_ids,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        pooled = outputs.last_hidden_state[:, 0]  # (B, H): the [CLS] token
        pooled = self.dropout(self.activation(self.dense(self.dropout(pooled))))
        logits = self.classifier(pooled)  # (B, num_labels)

        loss = None
        if labels is not None:
            if self.config.problem_type is None:
                if self.num_labels == 1:
                    self.config.problem_type = "regression"
                elif labels.dtype in (torch.long, torch.int):
                    self.config.problem_type = "single_label_classification"
                else:
                    self.config.problem_type = "multi_label_classification"
            if self.config.problem_type == "regression":
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.squeeze(-1).float())
            elif self.config.problem_type == "single_label_classification":
                loss = F.cross_entropy(logits.view(-1, self.num_labels).float(), labels.view(-1))
            else:
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())

        if not return_dict:
            rest = (logits, outputs.hidden_states, outputs.attentions)
            return tuple(v for v in ((loss,) if loss is not None else ()) + rest if v is not None)
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class NeoBERTForTokenClassification(NeoBERTPreTrainedModel):
    """Per-token dropout → linear classifier on the final hidden states (NER, POS tagging)."""

    def __init__(self, config: NeoBERTConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = NeoBERTModel(config)
        p = config.dropout if config.classifier_dropout is None else config.classifier_dropout
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> TokenClassifierOutput | tuple:
        """``logits (B, T, num_labels)``; loss = mean token cross-entropy over labels != -100."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            document_ids=document_ids,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.classifier(self.dropout(outputs.last_hidden_state))  # (B, T, num_labels)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, self.num_labels).float(), labels.reshape(-1), ignore_index=-100)
        if not return_dict:
            rest = (logits, outputs.hidden_states, outputs.attentions)
            return tuple(v for v in ((loss,) if loss is not None else ()) + rest if v is not None)
        return TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


__all__ = [
    "NeoBERTModel",
    "NeoBERTForMaskedLM",
    "NeoBERTForSequenceClassification",
    "NeoBERTForTokenClassification",
    "NeoBERTPreTrainedModel",
    "NeoBERTLayer",
    "NeoBERTAttention",
    "NeoBERTMLP",
    "NEOBERT_ATTENTION_FUNCTIONS",
    "NeoBERTModelOutput",
    "NeoBERTMaskedLMOutput",
    "max_qk_logit_per_row",
]
