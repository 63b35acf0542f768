"""Regression tests for issue #14's Muon/Dion2 bugs and upstream API parity (closed-form expectations; no upstream
needed). The differential harness against upstream itself is test_upstream_differential.py."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from neobert_pt.optim.dion2 import Dion2
from neobert_pt.optim.muon import Muon
from neobert_pt.optim.orthogonalize import KJ_COEFFS, newton_schulz_kj


def test_muon_bf16_momentum_uses_fp32_mu() -> None:
    """Bug 2: μ=0.9 must not be rounded to bf16 (0.8984375) before multiplying a bf16 momentum."""
    gen = torch.Generator().manual_seed(0)
    w = nn.Parameter(torch.randn(8, 16, generator=gen).bfloat16())
    grads = [torch.randn(8, 16, generator=gen).bfloat16() for _ in range(2)]
    opt = Muon([w], mu=0.9)
    for g in grads:
        w.grad = g
        opt.step()
    expected = ((grads[0].float() * torch.tensor(0.9)).bfloat16().float() + grads[1].float()).bfloat16()
    assert torch.equal(opt.state[w]["momentum"], expected)


def test_muon_adamw_bias_correction_counts_each_parameter_steps() -> None:
    """Bug 3: a param whose grad was None at step 1 is bias-corrected for its own 3 steps, like torch.optim.AdamW."""
    gen = torch.Generator().manual_seed(1)
    w, b = nn.Parameter(torch.randn(8, 16, generator=gen)), nn.Parameter(torch.randn(8, generator=gen))
    ref = nn.Parameter(b.detach().clone())
    opt = Muon([{"params": [w]}, {"params": [b], "algorithm": "adamw"}], lr=0.01)
    torch_adamw = torch.optim.AdamW([ref], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    for step in range(4):
        w.grad = torch.randn(8, 16, generator=gen)
        gb = torch.randn(8, generator=gen)
        b.grad = None if step == 0 else gb
        opt.step()
        if step:
            ref.grad = gb.clone()
            torch_adamw.step()
    assert opt.state[b]["step"].item() == 3 and opt.param_groups[1]["step"] == 4
    assert (b - ref).abs().max() <= 1e-7


@pytest.mark.parametrize(("lr", "wd"), [(0.02, 0.1), (0.01, 0.01)])
def test_dion2_lion_bf16_weight_decay_factor_is_fp32(lr: float, wd: float) -> None:
    """Bug 4: with zero gradients Lion only decays; the factor 1 - lr·wd is applied in fp32, rounded once per step
    (bf16(1.5·0.998) = 1.5, not 1.4765625; with lr·wd < 2⁻⁹ the decay must not vanish from the factor either)."""
    p = nn.Parameter(torch.full((4,), 1.5, dtype=torch.bfloat16))
    opt = Dion2([{"params": [p], "algorithm": "lion"}], lr=lr, weight_decay=wd)
    expected = p.detach().clone()
    factor = 1 - torch.tensor(lr) * torch.tensor(wd)
    for _ in range(3):
        p.grad = torch.zeros_like(p)
        opt.step()
        expected = (expected.float() * factor).bfloat16()
    assert torch.equal(p.detach(), expected)
    assert expected[0].item() == 1.5  # one bf16 rounding per step keeps 1.5 (bf16 spacing at 1.5 is 2^-7)


def test_lion_update_is_rounded_like_upstream() -> None:
    """W ← W − bf16(η·sign(...)): the product is formed in the param dtype, then subtracted."""
    p = nn.Parameter(torch.tensor([1.0, -3.0, 0.3], dtype=torch.bfloat16))
    opt = Dion2([{"params": [p], "algorithm": "lion"}], lr=0.003, weight_decay=0.0)
    w0 = p.detach().clone()
    p.grad = torch.tensor([1.0, -1.0, 1.0], dtype=torch.bfloat16)
    opt.step()
    step = (torch.tensor([1.0, -1.0, 1.0]) * torch.tensor(0.003)).bfloat16()
    assert torch.equal(p.detach(), w0 - step)


def test_newton_schulz_kj_uses_reference_operation_order() -> None:
    """Keller Jordan's reference writes ``B = b * A + c * A @ A``, i.e. ``(c·A) @ A``, in bf16."""
    x = torch.randn(48, 96, generator=torch.Generator().manual_seed(2))
    a, b, c = KJ_COEFFS
    X = x.bfloat16()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(5):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    assert torch.equal(newton_schulz_kj(x, 5, 1e-7), X)
    assert torch.equal(newton_schulz_kj(x.mT, 5, 1e-7), X.mT)


def test_upstream_constructor_keywords_and_positional_order(caplog: pytest.LogCaptureFixture) -> None:
    w = nn.Parameter(torch.randn(8, 16))
    with caplog.at_level(logging.INFO, logger="neobert_pt.optim.orthogonalize"):
        # upstream dion.Dion2 positional order: mesh, lr, fraction, ef_decay, betas, wd, epsilon, adjust_lr, flatten,
        # use_triton, use_polar_express, use_gram_newton_schulz, newton_schulz_func, verbose, triton_post_ortho, scope
        d = Dion2([w], None, 0.02, 0.5, 0.9, (0.8, 0.9), 0.0, 1e-7, "rms_norm", False, True, False, True, None,
                  True, True, "global")
    assert sum("eager bf16 path" in r.message for r in caplog.records) == 1
    g = d.param_groups[0]
    assert (g["lr"], g["fraction"], g["ef_decay"], g["beta1"], g["beta2"], g["epsilon"], g["adjust_lr"]) == (
        0.02, 0.5, 0.9, 0.8, 0.9, 1e-7, "rms_norm")
    assert d._orth_method == "newton_schulz" and g["selection_scope"] == "global"
    # upstream dion.Muon: mesh, lr, mu, betas, wd, cautious_wd, epsilon, nesterov, adjust_lr, flatten, use_gram_ns,
    # use_triton, use_polar_express, newton_schulz_func
    m = Muon([w], None, 0.03, 0.8, (0.7, 0.8), 0.0, True, 1e-6, True, None, False, False, False, False, None)
    g = m.param_groups[0]
    assert (g["lr"], g["momentum"], g["betas"], g["cautious_wd"], g["eps"], g["nesterov"], g["adjust_lr"]) == (
        0.03, 0.8, (0.7, 0.8), True, 1e-6, True, "none")
    assert g["orthogonalization"] == "newton_schulz"
    # upstream group keys are accepted as aliases
    m2 = Muon([{"params": [nn.Parameter(torch.randn(4))], "algorithm": "adamw", "beta1": 0.5, "beta2": 0.6,
                "epsilon": 1e-5, "mu": 0.5}])
    assert m2.param_groups[0]["betas"] == (0.5, 0.6) and m2.param_groups[0]["eps"] == 1e-5


def test_muon_3d_params_are_batches_of_matrices_and_flatten_is_per_param() -> None:
    gen = torch.Generator().manual_seed(3)
    w3 = nn.Parameter(torch.randn(3, 8, 16, generator=gen))
    parts = [nn.Parameter(w3.detach()[i].clone()) for i in range(3)]
    o3, op = Muon([w3], lr=0.02), Muon(parts, lr=0.02)
    for _ in range(2):
        g = torch.randn(3, 8, 16, generator=gen)
        w3.grad = g
        for i, p in enumerate(parts):
            p.grad = g[i].clone()
        o3.step()
        op.step()
    assert torch.equal(w3.detach(), torch.stack([p.detach() for p in parts]))
    # flatten: one (4, 2·3·3) matrix per param
    conv = nn.Parameter(torch.randn(4, 2, 3, 3, generator=gen))
    flat = nn.Parameter(conv.detach().reshape(4, 18).clone())
    of, o2 = Muon([conv], flatten=True), Muon([flat])
    g = torch.randn(4, 2, 3, 3, generator=gen)
    conv.grad, flat.grad = g, g.reshape(4, 18).clone()
    of.step()
    o2.step()
    assert torch.equal(conv.detach().reshape(4, 18), flat.detach())


def test_dion2_flatten_and_verbose(caplog: pytest.LogCaptureFixture) -> None:
    gen = torch.Generator().manual_seed(4)
    conv = nn.Parameter(torch.randn(4, 2, 3, 3, generator=gen))
    flat = nn.Parameter(conv.detach().reshape(4, 18).clone())
    with caplog.at_level(logging.INFO, logger="neobert_pt.optim.dion2"):
        of, o2 = Dion2([conv], flatten=True, fraction=0.5, verbose=True), Dion2([flat], fraction=0.5)
        for _ in range(2):
            g = torch.randn(4, 2, 3, 3, generator=gen)
            conv.grad, flat.grad = g, g.reshape(4, 18).clone()
            of.step()
            o2.step()
    assert torch.equal(conv.detach().reshape(4, 18), flat.detach())
    assert sum("selecting 2 rows" in r.message for r in caplog.records) == 1


def test_fast_cpu_orthogonalization_is_an_explicit_opt_in() -> None:
    """The config key reaches every matrix group (and the log); off by default. The fast path is a different but
    equally good approximation: close in direction to the exact one, and identical off CPU-only rounding."""
    from neobert_pt.modeling import NeoBERTConfig, NeoBERTForMaskedLM
    from neobert_pt.optim.config import Dion2Config, MuonConfig, OptimizerConfig
    from neobert_pt.optim.orthogonalize import orthogonalize
    from neobert_pt.optim.registry import OptimizerContext, build_optimizer

    model = NeoBERTForMaskedLM(NeoBERTConfig(vocab_size=61, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=4, intermediate_size=64))
    for name, block, sub in (("muonclip", "muon_config", MuonConfig), ("dion2", "dion2_config", Dion2Config)):
        for fast in (False, True):
            cfg = OptimizerConfig(name=name, **{block: sub(enable_clipping=False, fast_cpu_orthogonalization=fast)})
            built = build_optimizer(OptimizerContext(model=model, config=cfg, max_steps=10))
            matrix_groups = [g for g in built.optimizer.param_groups if g["algorithm"] in ("muon", "dion2")]
            assert matrix_groups and all(g["fast_cpu_orthogonalization"] is fast for g in matrix_groups)
            assert any("fast_cpu_orthogonalization" in line for line in built.log_lines) is fast
    x = torch.randn(128, 256, generator=torch.Generator().manual_seed(5))
    for method in ("polar_express", "newton_schulz", "newton_schulz_kj"):
        exact, fast = orthogonalize(x, method).double(), orthogonalize(x, method, fast_cpu=True).double()
        assert torch.nn.functional.cosine_similarity(exact.flatten(), fast.flatten(), dim=0) >= 0.999
        assert (exact - fast).abs().max() <= 0.06 * exact.abs().max()
