"""docs/specs/dana.md §4 invariants of the DANA family: closed forms, reductions, bounds, invariances, state and dtype
handling."""

from __future__ import annotations

import io
import math

import pytest
import torch

from neobert_pt.optim.dana import AdamWDecayingWD, ADana, DanaStar

F64 = torch.float64
DANA = {"adana": (ADana, None), "dana-mk4": (ADana, 0.3), "dana-star": (DanaStar, None), "dana-star-mk4": (DanaStar, 0.3)}


def make(variant: str, params, **kw) -> torch.optim.Optimizer:
    if variant == "adamw-decaying-wd":
        kw.pop("clipsnr", None)
        return AdamWDecayingWD(params, **{"lr": 1e-2, "weight_decay": 0.05, "wd_decaying": True, "wd_ts": 3.0, **kw})
    cls, clip = DANA[variant]
    base = {"lr": 1e-2, "delta": 4.0, "kappa": 0.5, "weight_decay": 0.05, "clipsnr": clip, "wd_decaying": True,
            "wd_ts": 3.0}
    return cls(params, **{**base, **kw})


def grad_sequence(steps: int, shape=(5, 4), seed: int = 0, sparsity: float = 0.3) -> list[torch.Tensor]:
    """Gaussian gradients with a drift (so momentum matters) and some exact zeros (so tau matters)."""
    gen = torch.Generator().manual_seed(seed)
    drift = torch.randn(shape, generator=gen, dtype=F64)
    grads = []
    for _ in range(steps):
        g = 0.5 * drift + torch.randn(shape, generator=gen, dtype=F64)
        g[torch.rand(shape, generator=gen) < sparsity] = 0.0
        grads.append(g)
    return grads


def run(variant, grads, *, theta0=None, lrs=None, dtype=F64, **kw):
    if theta0 is None:
        theta0 = torch.linspace(-1, 1, grads[0].numel(), dtype=F64).reshape(grads[0].shape)
    theta = torch.nn.Parameter(theta0.to(dtype, copy=True))
    opt = make(variant, [theta], **kw)
    for k, g in enumerate(grads):
        if lrs is not None:
            opt.param_groups[0]["lr"] = lrs[k]
        theta.grad = g.to(dtype)
        opt.step()
    return theta.detach(), opt


@pytest.mark.parametrize("variant", ["adana", "dana-star"])
def test_closed_form_without_clip(variant):
    """docs/specs/dana.md §4.2: ADana θ ← [θ − η(g + γ3(1 + (1+t)^(1−κ))m)/d](1 − f); Star with √ρ and the per-element
    clock."""
    delta, kappa, eps, wd, wd_ts, gamma3, peak = 4.0, 0.6, 1e-8, 0.05, 7.0, 0.8, 1e-2
    grads = grad_sequence(120)
    lrs = [peak * (0.3 + 0.7 * abs(math.cos(k / 9))) for k in range(120)]
    got, _ = run(variant, grads, lrs=lrs, delta=delta, kappa=kappa, epsilon=eps, weight_decay=wd, wd_ts=wd_ts,
                 gamma_3_factor=gamma3, lr=peak)
    theta = torch.linspace(-1, 1, 20, dtype=F64).reshape(5, 4)
    m, v, tau = torch.zeros_like(theta), torch.zeros_like(theta), torch.zeros_like(theta)
    for k, g in enumerate(grads):
        t = k + 1
        a = delta / (delta + t)
        m = (1 - a) * m + a * g
        v = (1 - a) * v + a * g * g
        d = v.sqrt() + eps
        f = wd * (lrs[k] / peak) / (1 + t / wd_ts)
        if variant == "adana":
            step = (g + gamma3 * (1 + (1 + t) ** (1 - kappa)) * m) / d
        else:
            tau = (1 - a) * tau + a * g.abs() / (g.abs() + d)
            tc = tau.clamp(max=0.5)
            rho = torch.maximum(tc / (1 - tc), torch.full_like(tc, 1 / (1 + t)))
            clock = (tau * t).clamp(min=1.0)
            step = rho.sqrt() * (g + gamma3 * (1 + clock ** (1 - kappa)) * m) / d
        theta = (theta - lrs[k] * step) * (1 - f)
    torch.testing.assert_close(got, theta, rtol=0, atol=1e-13)


@pytest.mark.parametrize("variant", list(DANA))
def test_gamma3_zero_is_log_time_rmsprop(variant):
    grads = grad_sequence(15)
    got, opt = run(variant, grads, gamma_3_factor=0.0, weight_decay=0.0)
    theta = torch.linspace(-1, 1, 20, dtype=F64).reshape(5, 4)
    v, tau = torch.zeros_like(theta), torch.zeros_like(theta)
    for k, g in enumerate(grads):
        t = k + 1
        a = 4.0 / (4.0 + t)
        v = (1 - a) * v + a * g * g
        d = v.sqrt() + 1e-8
        scale = torch.ones_like(g)
        if variant.startswith("dana-star"):
            tau = (1 - a) * tau + a * g.abs() / (g.abs() + d)
            tc = tau.clamp(max=0.5)
            scale = torch.maximum(tc / (1 - tc), torch.full_like(tc, 1 / (1 + t))).sqrt()
        theta = theta - 1e-2 * scale * g / d
    torch.testing.assert_close(got, theta, rtol=0, atol=1e-13)


def test_kappa_one_gives_constant_coefficient_two():
    grads = grad_sequence(10)
    got, _ = run("adana", grads, kappa=1.0, weight_decay=0.0)
    theta = torch.linspace(-1, 1, 20, dtype=F64).reshape(5, 4)
    m, v = torch.zeros_like(theta), torch.zeros_like(theta)
    for k, g in enumerate(grads):
        a = 4.0 / (4.0 + k + 1)
        m, v = (1 - a) * m + a * g, (1 - a) * v + a * g * g
        theta = theta - 1e-2 * (g + 2 * m) / (v.sqrt() + 1e-8)
    torch.testing.assert_close(got, theta, rtol=0, atol=1e-13)


@pytest.mark.parametrize("variant", ["adana", "dana-mk4"])
def test_infinite_delta_gives_sign_updates(variant):
    """δ → ∞: m = g, v = g², so each step is −η·sign(g)·(1 + γ3(1 + min((1+t)^(1−κ), c)))."""
    g = torch.tensor([[0.3, -2.0], [1e-3, 5.0]], dtype=F64)
    theta0 = torch.zeros_like(g)
    theta = torch.nn.Parameter(theta0.clone())
    clip = 1.2 if variant == "dana-mk4" else None
    opt = ADana([theta], lr=1e-2, delta=1e12, kappa=0.5, epsilon=1e-30, clipsnr=clip)
    expected = theta0.clone()
    for t in range(1, 5):
        theta.grad = g.clone()
        opt.step()
        nesterov = (1 + t) ** 0.5 if clip is None else min((1 + t) ** 0.5, clip)
        expected -= 1e-2 * g.sign() * (1 + (1 + nesterov))
        torch.testing.assert_close(theta.detach(), expected, rtol=1e-9, atol=0)


def test_infinite_delta_star_has_rho_one_and_half_clock():
    theta = torch.nn.Parameter(torch.zeros(3, dtype=F64))
    opt = DanaStar([theta], lr=1.0, delta=1e12, kappa=0.0, epsilon=1e-30, gamma_3_factor=1.0)
    g = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    for t in range(1, 5):
        before = theta.detach().clone()
        theta.grad = g.clone()
        opt.step()
        tau = opt.state[theta]["tau"]
        torch.testing.assert_close(tau, torch.full_like(tau, 0.5), rtol=1e-9, atol=0)
        # rho = 1, T = max(t/2, 1), kappa = 0: step = sign(g) * (1 + 1 + T)
        step = (before - theta.detach()) / g.sign()
        torch.testing.assert_close(step, torch.full_like(step, 2 + max(t / 2, 1)), rtol=1e-9, atol=0)


@pytest.mark.parametrize("plain,mk4", [("adana", "dana-mk4"), ("dana-star", "dana-star-mk4")])
def test_huge_clip_is_bitwise_unclipped(plain, mk4):
    grads = grad_sequence(20)
    a, _ = run(plain, grads)
    b, _ = run(mk4, grads, clipsnr=1e30)
    assert torch.equal(a, b)


@pytest.mark.parametrize("variant", [*DANA, "adamw-decaying-wd"])
def test_zero_gradient_decays_only_and_stays_finite(variant):
    grads = [torch.zeros(5, 4, dtype=F64)] * 6
    theta0 = torch.linspace(-1, 1, 20, dtype=F64).reshape(5, 4)
    got, opt = run(variant, grads, theta0=theta0)
    decay = math.prod(1 - 0.05 / (1 + t / 3.0) for t in range(1, 7))
    torch.testing.assert_close(got, theta0 * decay, rtol=1e-14, atol=0)
    for buf in opt.state[opt.param_groups[0]["params"][0]].values():
        if torch.is_tensor(buf):
            assert torch.isfinite(buf).all() and (buf == 0).all()


@pytest.mark.parametrize("variant", list(DANA))
def test_zero_lr_freezes_params_but_advances_state(variant):
    grads = grad_sequence(4)
    theta0 = torch.linspace(-1, 1, 20, dtype=F64).reshape(5, 4)
    got, opt = run(variant, grads, theta0=theta0, lrs=[0.0] * 4)
    assert torch.equal(got, theta0)
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert state["step"] == 4 and state["m"].abs().sum() > 0


@pytest.mark.parametrize("variant", list(DANA))
def test_bounds_hold_after_every_step(variant):
    """docs/specs/dana.md §4.4, recomputed from the state: |m| ≤ √v, 0 ≤ τ < 1, 1/(1+t) ≤ ρ ≤ 1, q < 1 without τ."""
    theta = torch.nn.Parameter(torch.zeros(5, 4, dtype=F64))
    opt = make(variant, [theta])
    for g in grad_sequence(60, sparsity=0.6):
        theta.grad = g
        opt.step()
        st = opt.state[theta]
        t = st["step"]
        assert (st["m"].abs() <= st["v"].sqrt() * (1 + 1e-12)).all()
        if "tau" in st:
            tau = st["tau"]
            assert ((tau >= 0) & (tau < 1)).all()
            tc = tau.clamp(max=0.5)
            rho = torch.maximum(tc / (1 - tc), torch.full_like(tc, 1 / (1 + t)))
            assert ((rho >= 1 / (1 + t)) & (rho <= 1)).all()
        else:
            assert (st["m"].abs() / (st["v"].sqrt() + 1e-8) < 1).all()


@pytest.mark.parametrize("variant", list(DANA))
def test_gradient_scale_invariance(variant):
    grads = grad_sequence(30)
    a, _ = run(variant, grads, epsilon=1e-30)
    b, _ = run(variant, [1000 * g for g in grads], epsilon=1e-30)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


@pytest.mark.parametrize("variant", list(DANA))
def test_odd_symmetry(variant):
    grads = grad_sequence(20)
    theta0 = torch.linspace(-1, 1, 20, dtype=F64).reshape(5, 4)
    a, _ = run(variant, grads, theta0=theta0)
    b, _ = run(variant, [-g for g in grads], theta0=-theta0)
    assert torch.equal(a, -b)


@pytest.mark.parametrize("variant", [*DANA, "adamw-decaying-wd"])
def test_param_without_grad_is_skipped(variant):
    x = torch.nn.Parameter(torch.ones(3, dtype=F64))
    y = torch.nn.Parameter(torch.ones(3, dtype=F64))
    opt = make(variant, [x, y])
    x.grad, y.grad = torch.full((3,), 0.5, dtype=F64), torch.full((3,), 0.5, dtype=F64)
    opt.step()
    y_after, y_state = y.detach().clone(), {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[y].items()}
    y.grad = None
    opt.step()
    assert torch.equal(y.detach(), y_after)
    assert opt.state[y]["step"] == 1 and opt.state[x]["step"] == 2
    for k, v in y_state.items():
        assert torch.equal(opt.state[y][k], v) if torch.is_tensor(v) else opt.state[y][k] == v


@pytest.mark.parametrize("variant", list(DANA))
def test_halving_lr_halves_step_and_decay(variant):
    grads = grad_sequence(3)
    theta0 = torch.linspace(-1, 1, 20, dtype=F64).reshape(5, 4)
    full, opt_full = run(variant, grads, theta0=theta0, lrs=[1e-2] * 3)
    half, opt_half = run(variant, grads, theta0=theta0, lrs=[1e-2, 1e-2, 5e-3])
    # Same state (a_t and the clock ignore the LR); last step: θ = (θ2 − ηΔ)(1 − f) with both η and f halved.
    prev, _ = run(variant, grads[:2], theta0=theta0)
    assert torch.equal(opt_full.state[opt_full.param_groups[0]["params"][0]]["m"],
                       opt_half.state[opt_half.param_groups[0]["params"][0]]["m"])
    f = 0.05 / (1 + 3 / 3.0)
    step_full = prev - full / (1 - f)
    step_half = prev - half / (1 - f / 2)
    torch.testing.assert_close(step_half, step_full / 2, rtol=1e-10, atol=1e-16)


def test_lambdalr_schedule_factor_uses_constructor_peak():
    """s_1 = λ(0): LambdaLR rescales group lr at construction; peak_lr stays the constructor lr."""
    g = torch.tensor([1.0, -1.0], dtype=F64)
    results = []
    for factor in (0.1, 1.0):
        theta = torch.nn.Parameter(torch.zeros(2, dtype=F64))
        opt = ADana([theta], lr=1e-2, weight_decay=0.0)
        torch.optim.lr_scheduler.LambdaLR(opt, lambda step, c=factor: c)
        assert opt.param_groups[0]["peak_lr"] == 1e-2
        theta.grad = g.clone()
        opt.step()
        results.append(theta.detach().clone())
    torch.testing.assert_close(results[0], results[1] * 0.1, rtol=1e-12, atol=0)


def test_group_peak_lr_defaults_to_its_own_lr():
    a, b = torch.nn.Parameter(torch.ones(2, dtype=F64)), torch.nn.Parameter(torch.ones(2, dtype=F64))
    opt = ADana([{"params": [a]}, {"params": [b], "lr": 2e-2}], lr=1e-2, weight_decay=0.1)
    assert [g["peak_lr"] for g in opt.param_groups] == [1e-2, 2e-2]
    a.grad, b.grad = torch.zeros(2, dtype=F64), torch.zeros(2, dtype=F64)
    opt.step()  # zero gradient: only WD acts, and it must be the same (s = 1) in both groups
    assert torch.equal(a.detach(), b.detach())


@pytest.mark.parametrize("variant", [*DANA, "adamw-decaying-wd"])
def test_state_dict_round_trip_continues_bitwise(variant):
    grads = grad_sequence(10)
    reference, _ = run(variant, grads)

    theta = torch.nn.Parameter(torch.linspace(-1, 1, 20, dtype=F64).reshape(5, 4))
    opt = make(variant, [theta])
    for g in grads[:4]:
        theta.grad = g
        opt.step()
    buffer = io.BytesIO()
    torch.save({"param": theta.detach(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = torch.nn.Parameter(saved["param"].clone())
    # Different constructor values: the saved groups must win, so behaviour cannot silently change.
    fresh = make(variant, [resumed], lr=0.5, weight_decay=0.9, wd_ts=100.0)
    fresh.load_state_dict(saved["opt"])
    for g in grads[4:]:
        resumed.grad = g
        fresh.step()
    assert torch.equal(resumed.detach(), reference)


@pytest.mark.parametrize("variant", list(DANA))
def test_deterministic(variant):
    grads = grad_sequence(15)
    assert torch.equal(run(variant, grads)[0], run(variant, grads)[0])


@pytest.mark.parametrize("variant", [*DANA, "adamw-decaying-wd"])
def test_shard_locality_chunks_give_identical_updates(variant):
    """docs/specs/dana.md §4.11: row chunks stepped as separate params (like FSDP2 Shard(0)) match the whole tensor
    bitwise."""
    grads = grad_sequence(12, shape=(6, 4), sparsity=0.4)
    theta0 = torch.linspace(-1, 1, 24, dtype=F64).reshape(6, 4)
    whole, _ = run(variant, grads, theta0=theta0, foreach=True)
    chunks = [torch.nn.Parameter(c.clone()) for c in theta0.split([1, 3, 2])]
    opt = make(variant, chunks, foreach=True)
    for g in grads:
        for c, gc in zip(chunks, g.split([1, 3, 2]), strict=True):
            c.grad = gc.clone()
        opt.step()
    assert torch.equal(torch.cat([c.detach() for c in chunks]), whole)


@pytest.mark.parametrize("variant", [*DANA, "adamw-decaying-wd"])
def test_bf16_params_keep_fp32_state_and_track_fp32(variant):
    grads = grad_sequence(20)
    theta0 = torch.linspace(-1, 1, 20, dtype=F64).reshape(5, 4).to(torch.bfloat16).double()
    ref, _ = run(variant, grads, theta0=theta0, dtype=torch.float32)
    got, opt = run(variant, grads, theta0=theta0, dtype=torch.bfloat16)
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert got.dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 for v in state.values() if torch.is_tensor(v))
    # bf16 params re-round every step: 20 steps of relative error 2^-8 at most.
    torch.testing.assert_close(got.float(), ref, rtol=20 * 2**-8, atol=1e-3)
    # A checkpoint reload keeps the state fp32 (torch would cast it to the param dtype).
    fresh = make(variant, [torch.nn.Parameter(got.clone())])
    fresh.load_state_dict(opt.state_dict())
    assert all(v.dtype == torch.float32 for v in fresh.state[fresh.param_groups[0]["params"][0]].values()
               if torch.is_tensor(v))


def test_log_time_ema_does_not_freeze_with_bf16_params():
    """docs/specs/dana.md §4.12 hazard: g² switching 1 → 4 at t=1000; bf16 state would stall, fp32 state reaches v ≈
    4."""
    theta = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    opt = ADana([theta], lr=0.0, delta=8.0, foreach=False)
    for t in range(1, 3001):
        theta.grad = torch.full((4,), 1.0 if t <= 1000 else 2.0, dtype=torch.bfloat16)
        opt.step()
    assert opt.state[theta]["v"].dtype == torch.float32
    torch.testing.assert_close(opt.state[theta]["v"], torch.full((4,), 4.0), rtol=1e-3, atol=0)
    torch.testing.assert_close(opt.state[theta]["m"], torch.full((4,), 2.0), rtol=1e-3, atol=0)


@pytest.mark.parametrize("variant", list(DANA))
def test_bf16_grad_equals_fp32_run_on_rounded_grad(variant):
    grads = [g.to(torch.bfloat16) for g in grad_sequence(8)]
    theta0 = torch.linspace(-1, 1, 20, dtype=torch.float32).reshape(5, 4)
    a = torch.nn.Parameter(theta0.clone())
    b = torch.nn.Parameter(theta0.clone())
    a.grad_dtype = torch.bfloat16  # what FSDP2 with reduce_dtype=bf16 hands the optimizer
    opt_a, opt_b = make(variant, [a]), make(variant, [b])
    for g in grads:
        a.grad, b.grad = g, g.float()
        opt_a.step()
        opt_b.step()
    assert torch.equal(a.detach(), b.detach())


def test_invalid_arguments_and_sparse_grads_are_rejected():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="epsilon"):
        ADana(p, lr=1e-3, epsilon=0.0)
    with pytest.raises(ValueError, match="clipsnr"):
        DanaStar(p, lr=1e-3, clipsnr=0.0)
    with pytest.raises(ValueError, match="delta"):
        ADana(p, lr=1e-3, delta=-1.0)
    with pytest.raises(ValueError, match="wd_ts"):
        AdamWDecayingWD(p, lr=1e-3, wd_ts=0.0)
    emb = torch.nn.Embedding(4, 2, sparse=True)
    opt = ADana(emb.parameters(), lr=1e-3)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
