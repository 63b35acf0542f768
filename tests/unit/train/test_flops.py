"""The documented NeoBERT FLOP count against torch's FlopCounterMode on a real forward + backward, and the peak
table / MFU arithmetic."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from neobert_pt.modeling import NeoBERTConfig, NeoBERTForMaskedLM
from neobert_pt.train.flops import flops_per_token, mfu, neobert_flops, peak_tflops_for, throughput_flops


@pytest.mark.parametrize("act, masked_only", [("swiglu", True), ("gelu", True), ("swiglu", False)])
def test_flop_count_matches_flop_counter_mode(act, masked_only):
    torch.manual_seed(0)
    # eager attention: its Q·Kᵀ and P·V are bmm calls the counter sees (CPU sdpa has no registered FLOP formula)
    cfg = NeoBERTConfig(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, intermediate_size=512,
                        vocab_size=1000, hidden_act=act, masked_logits_only=masked_only, attn_implementation="eager")
    model = NeoBERTForMaskedLM(cfg)
    b, t = 2, 96
    ids = torch.randint(5, 1000, (b, t))
    labels = torch.full_like(ids, -100)
    labels[:, ::7] = ids[:, ::7]
    masked = int((labels != -100).sum())
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=labels).loss.backward()
    measured = counter.get_total_flops()
    decoded = masked if masked_only else b * t
    predicted = neobert_flops(cfg, tokens=b * t, masked_tokens=decoded, attention_pairs=b * t * t)
    assert abs(predicted - measured) / measured < 0.02, (predicted, measured)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=ids, labels=labels)
    forward = neobert_flops(cfg, tokens=b * t, masked_tokens=decoded, attention_pairs=b * t * t, training=False)
    assert abs(forward - counter.get_total_flops()) / counter.get_total_flops() < 0.02


def test_per_token_and_throughput_forms_agree():
    cfg = NeoBERTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                        vocab_size=30522)
    per_token = flops_per_token(cfg, seq_len=1024, masked_fraction=0.2)
    assert throughput_flops(cfg, tokens=8192, masked_tokens=0.2 * 8192, seq_len=1024) == pytest.approx(8192 * per_token)
    # the 100M recipe: ~6·N per token for the encoder matmuls, plus attention and the masked decoder
    encoder_params = 12 * (4 * 768**2 + 3 * 768 * cfg.ffn_inner_size)
    assert per_token > 6 * encoder_params


def test_peak_table_and_mfu():
    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops_for("NVIDIA H200") == 989.0
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_for("CPU") is None
    assert mfu(400.0, 989.0) == pytest.approx(0.4044, abs=1e-4)
    assert mfu(1.0, None) is None
