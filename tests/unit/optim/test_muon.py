"""Muon optimizer: upstream fixture parity, update scale, per-projection QKV, state round trip, muonclip routing."""

from __future__ import annotations

import base64
import io
import json
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from neobert_pt.optim.muon import Muon, adjusted_lr_factor

MATRICES = ("0.weight", "1.weight")
VECTORS = ("0.bias", "1.bias")


@pytest.fixture(scope="module")
def fixture() -> dict:
    path = os.path.join(os.path.dirname(__file__), "..", "..", "assets", "specs", "dion2_cpu_reference.json")
    with open(path) as f:
        return json.load(f)


def decode(entry: dict) -> torch.Tensor:
    raw = np.frombuffer(base64.b64decode(entry["f32le_b64"]), "<f4").reshape(entry["shape"])
    return torch.from_numpy(raw.copy())


def _fixture_optimizer(params: dict[str, nn.Parameter], kwargs: dict) -> Muon:
    """The fixture's setup in our vocabulary: upstream ``mu`` is ``momentum``, ``use_polar_express=False`` is NS5."""
    ours = dict(
        lr=kwargs["lr"],
        mu=kwargs["mu"],
        weight_decay=kwargs["weight_decay"],
        nesterov=kwargs.get("nesterov", False),
    )
    if kwargs.get("use_polar_express", True) is False:
        ours["orthogonalization"] = "newton_schulz"
    groups = [{"params": [params[n] for n in MATRICES]}, {"params": [params[n] for n in VECTORS], "algorithm": "adamw"}]
    return Muon(groups, **ours)


@pytest.mark.parametrize("run", ["muon_pe", "muon_ns5_nesterov"])
def test_reproduces_upstream_fixture(fixture: dict, run: str) -> None:
    spec = fixture["runs"][run]
    params = {n: nn.Parameter(decode(e)) for n, e in fixture["init"].items()}
    opt = _fixture_optimizer(params, spec["kwargs"])
    for step, ref in enumerate(spec["steps"]):
        for n, p in params.items():
            p.grad = decode(fixture["grads"][step][n])
        opt.step()
        for n in MATRICES:
            assert torch.equal(opt.state[params[n]]["momentum"], decode(ref["momentum"][n])), (run, step, n)
            assert (params[n].detach() - decode(ref["params"][n])).abs().max() <= 1e-6, (run, step, n)
        for n in VECTORS:
            assert (params[n].detach() - decode(ref["params"][n])).abs().max() <= 1e-7, (run, step, n)


def _one_step_update(shape: tuple[int, int], **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(update ΔW = W0 - W1 after one step with no decay, the gradient used)."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(*shape))
    w0 = p.detach().clone()
    p.grad = torch.randn(*shape)
    Muon([p], weight_decay=0.0, **{"lr": 0.01, **kwargs}).step()
    return w0 - p.detach(), p.grad


@pytest.mark.parametrize("shape", [(32, 96), (96, 32)])
@pytest.mark.parametrize("method,band", [("polar_express", (0.95, 1.05)), ("newton_schulz_kj", (0.7, 1.0))])
def test_rms_norm_update_rms_matches_adamw_scale(shape: tuple, method: str, band: tuple) -> None:
    """Moonlight rule: 0.2*sqrt(max(m,n)) gives an element RMS of ~0.2*lr for a full-rank orthogonal update."""
    delta, _ = _one_step_update(shape, adjust_lr="rms_norm", orthogonalization=method)
    ratio = delta.pow(2).mean().sqrt().item() / (0.2 * 0.01)
    assert band[0] <= ratio <= band[1], ratio


@pytest.mark.parametrize("shape", [(32, 96), (96, 32)])
@pytest.mark.parametrize("adjust_lr", ["spectral_norm", "none"])
def test_spectral_and_none_scale_the_top_singular_value(shape: tuple, adjust_lr: str) -> None:
    delta, _ = _one_step_update(shape, adjust_lr=adjust_lr)
    expected = 0.01 * adjusted_lr_factor(adjust_lr, shape)
    assert adjusted_lr_factor("spectral_norm", shape) == pytest.approx(math.sqrt(shape[0] / shape[1]))
    ratio = torch.linalg.matrix_norm(delta, ord=2).item() / expected
    assert 0.9 <= ratio <= 1.2, ratio


def test_update_direction_matches_svd_muon_with_nesterov() -> None:
    """Momentum recursion M_t = mu*M + G and Nesterov input G + mu*M, against an SVD-based reference."""
    torch.manual_seed(1)
    p = nn.Parameter(torch.randn(24, 64))
    opt = Muon([p], lr=0.01, mu=0.9, nesterov=True, weight_decay=0.0, adjust_lr="none")
    m = torch.zeros(24, 64)
    for _ in range(3):
        g = torch.randn(24, 64)
        w0 = p.detach().clone()
        p.grad = g
        opt.step()
        m = 0.9 * m + g
        u, _, vh = torch.linalg.svd(g + 0.9 * m, full_matrices=False)
        cos = torch.nn.functional.cosine_similarity((w0 - p.detach()).flatten(), (u @ vh).flatten(), dim=0)
        assert cos >= 0.95
    assert torch.allclose(opt.state[p]["momentum"], m, atol=1e-5)


def test_fused_qkv_blocks_are_orthogonalised_separately() -> None:
    """A (3H, H) weight with split_rows=3 moves exactly like three independent (H, H) Muon matrices."""
    torch.manual_seed(2)
    h = 16
    fused = nn.Parameter(torch.randn(3 * h, h))
    parts = [nn.Parameter(block.clone()) for block in fused.detach().split(h)]
    kw = dict(lr=0.01, mu=0.95, nesterov=True, weight_decay=0.1, adjust_lr="rms_norm")
    opt_fused = Muon([{"params": [fused], "split_rows": 3}], **kw)
    opt_parts = Muon([{"params": parts}], **kw)
    for _ in range(2):
        g = torch.randn(3 * h, h)
        fused.grad = g
        for part, gb in zip(parts, g.split(h), strict=True):
            part.grad = gb.clone()
        w0 = fused.detach().clone()
        opt_fused.step()
        opt_parts.step()
        assert torch.equal(fused.detach(), torch.cat([part.detach() for part in parts]))
    # Each Q/K/V block of the update is ~orthogonal at the (H, H) scale; the stacked matrix is not (its singular
    # values are ~sqrt(3) times larger), so the projections were not orthogonalised jointly.
    scale = 0.01 * 0.2 * math.sqrt(h)
    update = (w0 * (1 - 0.01 * 0.1) - fused.detach()) / scale
    for block in update.split(h):
        assert torch.linalg.svdvals(block).max() <= 1.2
    assert torch.linalg.svdvals(update).min() >= 1.3


def test_decoupled_weight_decay_uses_group_lr() -> None:
    p = nn.Parameter(torch.randn(8, 16))
    w0 = p.detach().clone()
    p.grad = torch.zeros(8, 16)  # zero gradient: orthogonalised update is exactly zero, only decay remains
    Muon([p], lr=0.05, weight_decay=0.2).step()
    assert torch.equal(p.detach(), w0 * torch.tensor(1 - 0.05 * 0.2, dtype=torch.float32))


def _toy_problem() -> tuple[list[nn.Parameter], list[dict]]:
    torch.manual_seed(3)
    mats = [nn.Parameter(torch.randn(12, 24)) for _ in range(3)] + [nn.Parameter(torch.randn(18, 8))]
    vecs = [nn.Parameter(torch.randn(12))]
    groups = [
        {"params": mats[:3], "nesterov": True, "adjust_lr": "rms_norm"},
        {"params": mats[3:], "split_rows": 3},
        {"params": vecs, "algorithm": "adamw", "weight_decay": 0.0},
    ]
    return mats + vecs, groups


def _grads(params: list[nn.Parameter], step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def test_state_dict_round_trip_continues_identically() -> None:
    params, groups = _toy_problem()
    opt = Muon(groups, lr=0.02)
    for s in range(2):
        _grads(params, s)
        opt.step()
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buf)
    for s in range(2, 4):
        _grads(params, s)
        opt.step()
    buf.seek(0)
    saved = torch.load(buf)
    params2, groups2 = _toy_problem()
    with torch.no_grad():
        for p, v in zip(params2, saved["params"], strict=True):
            p.copy_(v)
    opt2 = Muon(groups2, lr=0.02)
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[0]["step"] == 2
    for s in range(2, 4):
        _grads(params2, s)
        opt2.step()
    for a, b in zip(params, params2, strict=True):
        assert torch.equal(a, b)


def test_deterministic_and_scalar_group_is_plain_adamw() -> None:
    runs = []
    for _ in range(2):
        params, groups = _toy_problem()
        ref = nn.Parameter(params[-1].detach().clone())
        adamw = torch.optim.AdamW([ref], lr=0.02, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
        opt = Muon(groups, lr=0.02)
        for s in range(3):
            _grads(params, s)
            ref.grad = params[-1].grad.clone()
            opt.step()
            adamw.step()
        assert torch.allclose(params[-1], ref, atol=1e-7, rtol=0)
        runs.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_invalid_groups_raise() -> None:
    with pytest.raises(ValueError, match="unknown algorithm"):
        Muon([{"params": [nn.Parameter(torch.randn(4, 4))], "algorithm": "lion"}])
    with pytest.raises(ValueError, match="ndim >= 2"):
        Muon([nn.Parameter(torch.randn(4))])
    with pytest.raises(ValueError, match="split_rows"):
        Muon([{"params": [nn.Parameter(torch.randn(10, 4))], "split_rows": 3}])
    with pytest.raises(ValueError, match="adjust_lr"):
        Muon([nn.Parameter(torch.randn(4, 4))], adjust_lr="moonlight")
    with pytest.raises(ValueError, match="beta2"):
        Muon([{"params": [nn.Parameter(torch.randn(4))], "algorithm": "adamw", "beta1": 0.8}])


def _tiny_mlm() -> nn.Module:
    from neobert_pt.modeling import NeoBERTConfig, NeoBERTForMaskedLM

    torch.manual_seed(4)
    cfg = NeoBERTConfig(
        vocab_size=61,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        masked_logits_only=False,
    )
    return NeoBERTForMaskedLM(cfg)


def _build(model: nn.Module, **muon_config):
    from neobert_pt.optim.config import MuonConfig, OptimizerConfig
    from neobert_pt.optim.registry import OptimizerContext, build_optimizer

    cfg = OptimizerConfig(
        name="muonclip",
        lr=1e-3,
        betas=[0.9, 0.98],
        weight_decay=0.1,
        muon_config=MuonConfig(**{"enable_clipping": False, **muon_config}),
    )
    return build_optimizer(OptimizerContext(model=model, config=cfg, max_steps=10))


def test_muonclip_routes_embedding_to_adamw_and_splits_qkv() -> None:
    model = _tiny_mlm()
    built = _build(model, adam_lr=2e-3)
    opt = built.optimizer
    assert built.qk_clip is None
    emb = model.model.embeddings.weight
    assert model.lm_head.weight is emb  # tied: the LM head is the embedding tensor
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert by_param[id(emb)]["algorithm"] == "adamw" and by_param[id(emb)]["weight_decay"] == 0.0
    assert by_param[id(emb)]["lr"] == 2e-3
    for layer in model.model.layers:
        qkv = by_param[id(layer.attention.qkv.weight)]
        assert qkv["algorithm"] == "muon" and qkv["split_rows"] == 3 and qkv["weight_decay"] == 0.1
        for p in (layer.attention.out_proj.weight, layer.ffn.down_proj.weight):
            assert by_param[id(p)]["algorithm"] == "muon" and by_param[id(p)]["split_rows"] == 1
    muon_ids = {id(p) for g in opt.param_groups if g["algorithm"] == "muon" for p in g["params"]}
    assert all(p.ndim == 2 for g in opt.param_groups if g["algorithm"] == "muon" for p in g["params"])
    assert id(emb) not in muon_ids
    assert sum(line.startswith("muonclip group") for line in built.log_lines) == len(opt.param_groups)

    # One real step: the embedding moves like AdamW's first step (-lr*sign(g) where it has a gradient), which an
    # orthogonalised update would not do.
    ids = torch.randint(1, 61, (2, 12))
    labels = torch.where(torch.rand(2, 12) < 0.3, ids, torch.full_like(ids, -100))
    labels[0, 0] = ids[0, 0]
    model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss.backward()
    w0, g = emb.detach().clone(), emb.grad.clone()
    opt.step()
    moved = g.abs() > 1e-4  # eps=1e-8 is negligible against these gradients
    assert torch.allclose((emb.detach() - w0)[moved], -2e-3 * g[moved].sign(), rtol=1e-3, atol=0)
    assert set(opt.state[emb]) == {"exp_avg", "exp_avg_sq", "step"}


def test_muonclip_with_clipping_returns_qk_clip() -> None:
    from neobert_pt.optim.qk_clip import QKClip

    built = _build(_tiny_mlm(), enable_clipping=True, clipping_threshold=30.0, clipping_interval=5)
    assert isinstance(built.qk_clip, QKClip)
    assert any(line.startswith("muonclip qk-clip: tau=30") for line in built.log_lines)


def test_muon_config_rejects_ignored_ns_steps() -> None:
    from neobert_pt.config.errors import ConfigError
    from neobert_pt.optim.config import MuonConfig

    with pytest.raises(ConfigError, match="ns_steps"):
        MuonConfig(ns_steps=3)
    assert MuonConfig(ns_steps=3, orthogonalization="newton_schulz_kj").ns_steps == 3
