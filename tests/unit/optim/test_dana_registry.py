"""The registry builds every DANA name from optimizer.dana_config on a tiny NeoBERT, decaying only the matrices."""

from __future__ import annotations

import pytest
import torch

from neobert_pt.config.errors import ConfigError
from neobert_pt.modeling import NeoBERTConfig, NeoBERTForMaskedLM
from neobert_pt.optim.config import DanaConfig, OptimizerConfig
from neobert_pt.optim.dana import AdamWDecayingWD, ADana, DanaStar
from neobert_pt.optim.registry import OptimizerContext, build_optimizer

EXPECTED = {
    "adana": (ADana, None),
    "dana-mk4": (ADana, 2.0),
    "dana-star": (DanaStar, None),
    "dana-star-mk4": (DanaStar, 2.0),
    "adamw-decaying-wd": (AdamWDecayingWD, None),
}


def tiny_model() -> NeoBERTForMaskedLM:
    torch.manual_seed(0)
    cfg = NeoBERTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, pad_token_id=0)
    return NeoBERTForMaskedLM(cfg)


def build(name: str, max_steps: int = 500, **dana) -> tuple:
    model = tiny_model()
    cfg = OptimizerConfig(name=name, lr=1e-3, dana_config=DanaConfig(**dana))
    return model, build_optimizer(OptimizerContext(model=model, config=cfg, max_steps=max_steps))


@pytest.mark.parametrize("name", list(EXPECTED))
def test_builds_with_paper_defaults_and_decays_only_matrices(name):
    model, built = build(name, max_steps=500)
    cls, clip = EXPECTED[name]
    opt = built.optimizer
    assert type(opt) is cls
    covered = {id(p) for g in opt.param_groups for p in g["params"]}
    assert covered == {id(p) for p in model.parameters()}
    for group in opt.param_groups:
        decayed = group["name"] in ("qkv", "matrix")
        # omega / wd_ts with wd_ts = floor(0.1 * 500) = 50, NOT omega / (lr * wd_ts).
        assert group["weight_decay"] == (4.0 / 50 if decayed else 0.0)
        assert group["wd_ts"] == 50 and group["wd_decaying"] is True and group["peak_lr"] == 1e-3
        if cls is not AdamWDecayingWD:
            assert (group["kappa"], group["delta"], group["clipsnr"]) == (0.85, 8.0, clip)
    assert any("omega/wd_ts" in line for line in built.log_lines)


def test_explicit_wd_ts_and_kappa_are_used():
    _, built = build("dana-star-mk4", wd_ts=20.0, kappa=0.75, omega=2.0, clipsnr=1.5)
    group = next(g for g in built.optimizer.param_groups if g["name"] == "matrix")
    assert (group["wd_ts"], group["weight_decay"], group["kappa"], group["clipsnr"]) == (20.0, 0.1, 0.75, 1.5)


@pytest.mark.parametrize("key,value", [("delta", 0.0), ("clipsnr", -1.0), ("omega", -1.0), ("wd_ts", 0.0)])
def test_invalid_dana_config_names_the_key(key, value):
    with pytest.raises(ConfigError, match=f"optimizer.dana_config.{key}"):
        DanaConfig(**{key: value})


@pytest.mark.parametrize("name", list(EXPECTED))
def test_a_few_steps_reduce_the_mlm_loss(name):
    model, built = build(name, max_steps=40)
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, 64, (4, 16), generator=gen)
    labels = input_ids.clone()
    labels[:, ::2] = -100
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    losses = []
    for _ in range(15):
        built.optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        built.optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
