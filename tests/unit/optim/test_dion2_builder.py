"""The ``dion2`` registry builder: routing of NeoBERT parameters, LR defaults, QK-clip, the upstream switch."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from neobert_pt.config.errors import ConfigError
from neobert_pt.modeling.configuration_neobert import NeoBERTConfig
from neobert_pt.modeling.modeling_neobert import NeoBERTForMaskedLM
from neobert_pt.optim.config import Dion2Config, OptimizerConfig
from neobert_pt.optim.dion2 import Dion2
from neobert_pt.optim.registry import OptimizerContext, build_optimizer

HAS_UPSTREAM = importlib.util.find_spec("dion") is not None


def _model() -> NeoBERTForMaskedLM:
    torch.manual_seed(0)
    cfg = NeoBERTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    return NeoBERTForMaskedLM(cfg)


def _build(model=None, **dion2):
    model = model or _model()
    cfg = OptimizerConfig(name="dion2", lr=6e-4, weight_decay=0.01)
    for key, value in dion2.items():
        setattr(cfg.dion2_config, key, value)
    return model, build_optimizer(OptimizerContext(model=model, config=cfg, max_steps=10))


def test_routes_matrices_to_dion2_and_the_rest_to_adamw_without_decay() -> None:
    model, built = _build()
    opt = built.optimizer
    assert isinstance(opt, Dion2) and built.qk_clip is None
    by_name = {g["name"]: g for g in opt.param_groups}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            is_matrix = ".layers." in name and p.ndim == 2
            assert group["algorithm"] == ("dion2" if is_matrix else "adamw"), name
            assert group["weight_decay"] == (0.01 if is_matrix else 0.0), name
    # tied LM head = the embedding tensor, stepped by AdamW
    assert model.lm_head.weight is model.model.embeddings.weight
    assert by_name["embedding"]["algorithm"] == "adamw"
    assert by_name["qkv"]["split_rows"] == 3 and by_name["matrix"]["split_rows"] == 1
    assert by_name["qkv"]["adjust_lr"] == "rms_norm"
    assert by_name["qkv"]["lr"] == pytest.approx(6e-4 / math.sqrt(0.25))
    assert by_name["embedding"]["lr"] == pytest.approx(6e-4)


def test_explicit_matrix_lr_and_upstream_adjust_lr() -> None:
    _, built = _build(matrix_lr=1e-3, adjust_lr="none", scalar_algorithm="lion", fraction=0.5)
    groups = built.optimizer.param_groups
    dion2 = [g for g in groups if g["algorithm"] == "dion2"]
    assert all(g["lr"] == 1e-3 and g["adjust_lr"] is None and g["fraction"] == 0.5 for g in dion2)
    assert {g["algorithm"] for g in groups} == {"dion2", "lion"}


def test_training_steps_reduce_loss_and_move_only_selected_qkv_rows() -> None:
    model, built = _build(fraction=0.25)
    opt = built.optimizer
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 64, (4, 16), generator=gen)
    labels = ids.clone()
    qkv = model.model.layers[0].attention.qkv.weight
    losses = []
    for step in range(8):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        before = qkv.detach().clone()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step == 0:  # each of the Q, K, V blocks moves exactly ceil(0.25 * 32) = 8 of its 32 rows
            lr = next(g["lr"] for g in opt.param_groups if g["name"] == "qkv")
            moved = (qkv.detach() != before * (1 - torch.tensor(lr) * 0.01)).any(dim=1)
            assert moved.view(3, 32).sum(dim=1).tolist() == [8, 8, 8]
    assert losses[-1] < losses[0]


def test_enable_clipping_returns_qk_clip() -> None:
    from neobert_pt.optim.qk_clip import QKClip

    _, built = _build(enable_clipping=True, clipping_threshold=30.0, clipping_interval=5)
    assert isinstance(built.qk_clip, QKClip)
    assert any("qk-clip" in line and "tau=30" in line for line in built.log_lines)


def test_config_errors() -> None:
    # ns_steps is refused when the config is built (load time), never accepted and then refused by the builder.
    with pytest.raises(ConfigError, match=r"ns_steps=3 is invalid: must be 5 \(Dion2's polar_express and newton_schulz"):
        Dion2Config(ns_steps=3)
    assert Dion2Config(ns_steps=5).ns_steps == 5
    with pytest.raises(ConfigError, match="fraction"):
        _build(fraction=0.0)


@pytest.mark.skipif(HAS_UPSTREAM, reason="upstream dion is installed")
def test_upstream_implementation_explains_how_to_install() -> None:
    with pytest.raises(ImportError, match="pip install"):
        _build(implementation="upstream")


@pytest.mark.skipif(not HAS_UPSTREAM, reason="upstream dion is not importable")
def test_native_matches_upstream_on_a_small_model(monkeypatch) -> None:
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    model_native, native = _build(_model(), adjust_lr="spectral_norm")
    model_upstream, upstream = _build(_model(), adjust_lr="spectral_norm", implementation="upstream")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 64, (4, 16), generator=gen)
    for model, built in ((model_native, native), (model_upstream, upstream)):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
        built.optimizer.step()
    # one step (same gradients); upstream has no split_rows (fused QKV is one matrix there): compare the rest
    for (name, a), b in zip(model_native.named_parameters(), model_upstream.parameters(), strict=True):
        if "qkv" not in name:
            assert (a - b).abs().max() <= 1e-6, name
