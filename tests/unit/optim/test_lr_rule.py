"""The peak-LR power laws reproduce the evaluated table of docs/specs/dana.md §3 and `optimizer.lr: auto` resolves
through them."""

from __future__ import annotations

import pytest
from torch import nn

from neobert_pt.config.errors import ConfigError
from neobert_pt.optim.config import OptimizerConfig
from neobert_pt.optim.lr_rule import count_non_embedding_params, resolve_lr, suggest_peak_lr

# docs/specs/dana.md §3 "Evaluated peak LRs at BERT-like P, batch-32 fit": P -> (adamw, adana .85, dana-mk4 .85,
# dana-star(-mk4) .85)
TABLE = {
    42_500_000: (1.51e-3, 4.34e-4, 3.79e-4, 6.43e-4),
    84_900_000: (1.06e-3, 2.83e-4, 2.46e-4, 3.97e-4),
    151_000_000: (7.85e-4, 1.98e-4, 1.71e-4, 2.64e-4),
    170_000_000: (7.39e-4, 1.84e-4, 1.59e-4, 2.43e-4),
    201_000_000: (6.77e-4, 1.66e-4, 1.43e-4, 2.15e-4),
}


@pytest.mark.parametrize("params", sorted(TABLE))
def test_small_batch_fit_matches_spec_table(params):
    adamw, adana, mk4, star = TABLE[params]
    expected = {"adamw": adamw, "adana": adana, "dana-mk4": mk4, "dana-star": star, "dana-star-mk4": star}
    for name, lr in expected.items():
        assert suggest_peak_lr(name, params) == pytest.approx(lr, rel=0.01), name


def test_large_batch_fit_and_geometric_interpolation():
    p = 84_900_000
    # docs/specs/dana.md §3: batch-512 fit at 84.9M, and the interpolated values at 131k / 262k tokens per step.
    assert suggest_peak_lr("adana", p, tokens_per_step=2**20) == pytest.approx(5.56e-4, rel=0.01)
    assert suggest_peak_lr("dana-mk4", p, tokens_per_step=2**20) == pytest.approx(5.75e-4, rel=0.01)
    assert suggest_peak_lr("dana-star-mk4", p, tokens_per_step=2**20) == pytest.approx(8.57e-4, rel=0.01)
    assert suggest_peak_lr("adana", p, tokens_per_step=131_072) == pytest.approx(3.3e-4, rel=0.02)
    assert suggest_peak_lr("adana", p, tokens_per_step=262_144) == pytest.approx(4.0e-4, rel=0.02)
    assert suggest_peak_lr("dana-star-mk4", p, tokens_per_step=131_072) == pytest.approx(4.8e-4, rel=0.02)
    assert suggest_peak_lr("dana-star-mk4", p, tokens_per_step=262_144) == pytest.approx(5.8e-4, rel=0.02)
    assert suggest_peak_lr("adana", 201_000_000, tokens_per_step=262_144) == pytest.approx(2.3e-4, rel=0.02)
    # Outside the fitted range the nearest fit is used; a single-fit optimizer ignores the batch size.
    assert suggest_peak_lr("adana", p, tokens_per_step=8192) == suggest_peak_lr("adana", p)
    assert suggest_peak_lr("adana", p, tokens_per_step=2**24) == suggest_peak_lr("adana", p, tokens_per_step=2**20)
    assert suggest_peak_lr("dana-star", p, tokens_per_step=2**20) == suggest_peak_lr("dana-star", p)


def test_kappa_keys_the_fit():
    # docs/specs/dana.md §3: at P = 85M, adana kappa 0.75 wants about 1.4e-4 versus 2.8e-4 at 0.85.
    assert suggest_peak_lr("adana", 85_000_000, kappa=0.75) == pytest.approx(1.4e-4, rel=0.03)
    with pytest.raises(ConfigError, match="kappa"):
        suggest_peak_lr("adana", 85_000_000, kappa=0.6)


class _TinyEncoder(nn.Module):
    """Parameter names follow the model contract so the param-group policy applies."""

    def __init__(self, d: int = 16, layers: int = 2, vocab: int = 50) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            block = nn.Module()
            block.attention_norm = nn.RMSNorm(d)
            block.attention = nn.Module()
            block.attention.qkv = nn.Linear(d, 3 * d, bias=False)
            block.attention.out_proj = nn.Linear(d, d, bias=False)
            block.ffn_norm = nn.RMSNorm(d)
            block.ffn = nn.Module()
            block.ffn.up_proj = nn.Linear(d, 4 * d, bias=False)
            block.ffn.down_proj = nn.Linear(4 * d, d, bias=False)
            self.layers.append(block)
        self.final_norm = nn.RMSNorm(d)


def test_resolve_lr_counts_block_matrices_like_12_d2_l():
    model = _TinyEncoder(d=16, layers=2)
    assert count_non_embedding_params(model) == 12 * 16**2 * 2
    cfg = OptimizerConfig(name="dana-star-mk4", lr="auto")
    assert resolve_lr(cfg, model, 65_536) == pytest.approx(suggest_peak_lr("dana-star-mk4", 12 * 16**2 * 2))
    assert resolve_lr(OptimizerConfig(name="adana", lr=3e-4), model, 65_536) == 3e-4


@pytest.mark.parametrize("name", ["muonclip", "dion2"])
def test_auto_lr_for_unsupported_optimizer_asks_for_a_number(name):
    with pytest.raises(ConfigError, match="set optimizer.lr to a number"):
        resolve_lr(OptimizerConfig(name=name, lr="auto"), _TinyEncoder(), 65_536)
