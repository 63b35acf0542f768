"""Model FLOPs of NeoBERT pretraining and MFU: the counted formula and the peak-FLOP/s table it is divided by.

What is counted (matmuls only; norms, RoPE, softmax, activations and the loss are O(T·H) and left out, as in the
PaLM / nanoGPT MFU convention). For one document of ``L`` tokens, hidden ``H``, ``nL`` layers, FFN width ``I`` (the
width actually built: SwiGLU shrinks it), vocabulary ``V`` and ``M`` masked (labelled) tokens, one FORWARD costs

    per layer:  2·L·H·3H      fused QKV projection
              + 2·L·H·H       output projection
              + 2·L·H·I·k     FFN, k = 3 for SwiGLU (gate, up, down), 2 for GELU (up, down)
              + 2·L²·H        Q·Kᵀ (all heads together: nH·L²·d = L²·H)
              + 2·L²·H        softmax(·)·V
    decoder:    2·M·H·V       the tied LM head, on masked positions only (``masked_logits_only``)

and a training step (forward + backward) costs 3× that: the backward of every matmul is two matmuls of the same
size (gradient w.r.t. the input and w.r.t. the weight, or dQ/dK and dS/dV for attention). Activation recomputation
is not counted (model FLOPs, not hardware FLOPs). In the trainer the attention term uses the row length ``T`` for
every token (``4·T·H`` per token and layer): that is what a dense-mask kernel computes, and the convention of the
PaLM MFU formula; a document-aware kernel does only ``Σ L_d²`` of it, so the figure can overstate such a run's work
by at most the attention share. ``neobert_flops`` takes the exact ``Σ L²`` when you have it.

``tests/unit/train/test_flops.py`` checks the formula against ``torch.utils.flop_counter.FlopCounterMode`` on a
real forward + backward (within 2%).
"""

from __future__ import annotations

from typing import Any

# Dense (non-sparse) bf16 tensor-core peak, TFLOP/s per device, from the vendors' datasheets. Matched as a
# case-insensitive substring of torch.cuda.get_device_name(), first match wins (so the specific names come first).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM / HBM3
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("MI300X", 1307.0),
)


def peak_tflops_for(device_name: str) -> float | None:
    """The table's bf16 dense peak for a device name, or None when the device is not listed (e.g. a CPU)."""
    name = device_name.lower()
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in name:
            return value
    return None


def _layer_matmul_params(config: Any) -> int:
    """Weights every token multiplies per layer: QKV (3H²) + out (H²) + the FFN matrices."""
    h, inner = config.hidden_size, config.ffn_inner_size
    ffn_mats = 3 if config.hidden_act == "swiglu" else 2
    return 4 * h * h + ffn_mats * h * inner


def neobert_flops(config: Any, *, tokens: float, masked_tokens: float, attention_pairs: float,
                  training: bool = True) -> float:
    """Model FLOPs of NeoBERT on a batch.

    ``tokens``: tokens run through the encoder (rows × row length for a dense batch); ``masked_tokens``: tokens
    that reach the decoder; ``attention_pairs``: (query, key) pairs attended, summed over rows, e.g. ``rows · T²``
    for dense rows or ``Σ L_d²`` over documents. ``training`` = forward + backward (3×), else forward only.
    """
    h, layers = config.hidden_size, config.num_hidden_layers
    forward = (2 * tokens * _layer_matmul_params(config) + 4 * attention_pairs * h) * layers
    forward += 2 * masked_tokens * h * config.vocab_size
    return 3 * forward if training else forward


def flops_per_token(config: Any, *, seq_len: int, masked_fraction: float) -> float:
    """Training FLOPs per encoder token at row length ``seq_len`` (attention over the whole row, see the module
    docstring), with ``masked_fraction`` of the tokens reaching the decoder."""
    return neobert_flops(config, tokens=1, masked_tokens=masked_fraction, attention_pairs=seq_len)


def throughput_flops(config: Any, *, tokens: float, masked_tokens: float, seq_len: int) -> float:
    """Training FLOPs of ``tokens`` real tokens in rows of length ``seq_len``: what the trainer divides by time."""
    return neobert_flops(config, tokens=tokens, masked_tokens=masked_tokens, attention_pairs=tokens * seq_len)


def mfu(tflops_per_device: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved / peak (None without a peak)."""
    if not peak_tflops:
        return None
    return tflops_per_device / peak_tflops
