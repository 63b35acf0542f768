"""Native Dion2: the upstream CPU fixture and the invariants of docs/specs/dion2_muonclip.md §5 (single process)."""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from neobert_pt.optim.dion2 import Dion2, num_selected
from neobert_pt.optim.muon import Muon
from neobert_pt.optim.orthogonalize import orthogonalize
from neobert_pt.optim.orthonormal import adjusted_lr_factor

FIXTURE = Path(__file__).resolve().parents[2] / "assets" / "specs" / "dion2_cpu_reference.json"
REF = json.loads(FIXTURE.read_text())
DION2_RUNS = sorted(k for k in REF["runs"] if k.startswith("dion2"))


def _decode(entry: dict) -> torch.Tensor:
    raw = np.frombuffer(base64.b64decode(entry["f32le_b64"]), "<f4").reshape(entry["shape"])
    return torch.from_numpy(raw.copy())


def _decay(lr: float, wd: float) -> torch.Tensor:
    """The fp32 weight-decay factor exactly as the optimizer forms it."""
    return 1 - torch.tensor(lr, dtype=torch.float32) * wd


def _selected_mask(m_prev: torch.Tensor, g: torch.Tensor, m_new: torch.Tensor) -> torch.Tensor:
    """Entries whose momentum was EF-decayed this step (off S: M_t = M_{t-1} + G_t exactly)."""
    return m_new != m_prev + g


# ------------------------------------------------------------------------------------------------ fixture
@pytest.mark.parametrize("run", DION2_RUNS)
def test_reproduces_upstream_fixture(run: str) -> None:
    spec = REF["runs"][run]
    names = list(REF["init"])
    params = {n: torch.nn.Parameter(_decode(REF["init"][n])) for n in names}
    opt = Dion2(
        [
            {"params": [params["0.weight"], params["1.weight"]]},
            {"params": [params["0.bias"], params["1.bias"]], "algorithm": "adamw"},
        ],
        **spec["kwargs"],
    )
    for step, expected in enumerate(spec["steps"]):
        grads = {n: _decode(REF["grads"][step][n]) for n in names}
        prev = {n: opt.state[params[n]]["momentum"].clone() for n in expected["momentum"]}
        for n in names:
            params[n].grad = grads[n]
        opt.step()
        for n in names:
            tol = 1e-6 if params[n].ndim == 2 else 1e-7
            assert (params[n].detach() - _decode(expected["params"][n])).abs().max() <= tol, (run, step, n)
        for n, entry in expected["momentum"].items():
            momentum = opt.state[params[n]]["momentum"]
            assert torch.equal(momentum, _decode(entry)), (run, step, n)
            sel = expected["dion2_selection"][n]
            mask = _selected_mask(prev[n], grads[n], momentum)
            axis = 1 if sel["select_dim"] == "rows" else 0
            assert mask.any(dim=axis).nonzero().flatten().tolist() == sel["indices"], (run, step, n)
    assert {n: sorted(opt.state[params[n]]) for n in names} == spec["state_keys"]
    assert set(spec["group_keys"]) <= set(opt.state_dict()["param_groups"][0])


# ------------------------------------------------------------------------------------------------ helpers
def _run(shape, grads, **kw) -> tuple[torch.nn.Parameter, Dion2, list[dict]]:
    """Step one matrix through ``grads``; record W, M before/after each step."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(shape) * 0.1)
    opt = Dion2([w], **kw)
    log = []
    for g in grads:
        before = dict(w=w.detach().clone(), m=opt.state[w]["momentum"].clone(), g=g)
        w.grad = g
        opt.step()
        log.append(dict(before, w_new=w.detach().clone(), m_new=opt.state[w]["momentum"].clone()))
    return w, opt, log


def _grads(shape, n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(n)]


# ------------------------------------------------------------------------------------------------ invariants
@pytest.mark.parametrize("shape", [(16, 32), (24, 24), (48, 16)])
@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 1.0, 1])
def test_selection_is_topk_l1_along_short_side(shape, fraction) -> None:
    _, _, log = _run(shape, _grads(shape, 2), fraction=fraction, ef_decay=0.9)
    rows = shape[0] <= shape[1]
    k = max(1, math.ceil(fraction * (shape[0] if rows else shape[1])))
    for rec in log:
        acc = rec["m"] + rec["g"]
        norms = acc.abs().sum(dim=1 if rows else 0)
        expected = set(norms.topk(k).indices.tolist())
        mask = _selected_mask(rec["m"], rec["g"], rec["m_new"])
        got = set(mask.any(dim=1 if rows else 0).nonzero().flatten().tolist())
        assert got == expected
        # the other axis is never partially selected: whole rows (columns) move
        sel = mask.any(dim=1) if rows else mask.any(dim=0)
        assert (mask.all(dim=1) if rows else mask.all(dim=0)).eq(sel).all()


@pytest.mark.parametrize("shape", [(16, 32), (48, 16)])
def test_update_is_sparse_besides_weight_decay(shape) -> None:
    lr, wd = 0.02, 0.1
    _, _, log = _run(shape, _grads(shape, 3), lr=lr, weight_decay=wd, fraction=0.25)
    for rec in log:
        delta = rec["w_new"] - rec["w"] * _decay(lr, wd)
        mask = _selected_mask(rec["m"], rec["g"], rec["m_new"])
        assert torch.all(delta[~mask] == 0)
        assert (delta[mask] != 0).float().mean() > 0.99


@pytest.mark.parametrize("use_polar_express", [True, False])
def test_applied_block_is_orthogonal(use_polar_express) -> None:
    shape, lr = (32, 128), 0.01
    _, _, log = _run(shape, _grads(shape, 3), lr=lr, fraction=0.5, weight_decay=0.0, adjust_lr=None,
                     use_polar_express=use_polar_express)
    for rec in log:
        mask = _selected_mask(rec["m"], rec["g"], rec["m_new"]).any(dim=1)
        o = -(rec["w_new"] - rec["w"])[mask] / lr  # (16, 128): aspect 8
        sv = torch.linalg.svdvals(o)
        assert 0.8 <= sv.min() and sv.max() <= 1.2 and 0.85 <= sv.median() <= 1.15
        u, _, vh = torch.linalg.svd((rec["m"] + rec["g"])[mask], full_matrices=False)
        polar = u @ vh
        assert torch.nn.functional.cosine_similarity(o.flatten(), polar.flatten(), dim=0) >= 0.98


def test_error_feedback_bookkeeping() -> None:
    shape, mu, steps = (16, 32), 0.8, 6
    grads = _grads(shape, steps)
    _, _, log = _run(shape, grads, ef_decay=mu, fraction=0.25)
    selected_mass = torch.zeros(shape)
    for rec in log:
        acc = rec["m"] + rec["g"]
        mask = _selected_mask(rec["m"], rec["g"], rec["m_new"])
        assert torch.equal(rec["m_new"][~mask], acc[~mask])
        assert torch.equal(rec["m_new"][mask], acc[mask] * mu)
        selected_mass += torch.where(mask, acc, 0.0)
    total = torch.stack(grads).sum(0)
    torch.testing.assert_close(log[-1]["m_new"] + (1 - mu) * selected_mass, total, atol=1e-5, rtol=0)
    # ef_decay=0 zeroes the selected slices; ef_decay=1 is a pure running sum
    _, _, log0 = _run(shape, grads[:2], ef_decay=0.0)
    assert (log0[0]["m_new"] == 0).any(dim=1).sum() == num_selected(0.25, 16)
    _, opt1, _ = _run(shape, grads, ef_decay=1.0)
    assert torch.allclose(opt1.state[opt1.param_groups[0]["params"][0]]["momentum"], total, atol=1e-5)


@pytest.mark.parametrize("shape", [(16, 32), (48, 16)])
def test_lr_scale_uses_full_shape(shape) -> None:
    lr, fraction = 0.01, 0.25
    _, _, log = _run(shape, _grads(shape, 2), lr=lr, fraction=fraction, weight_decay=0.0)
    m, n = shape
    eta = lr * math.sqrt(m / n)  # spectral_norm from the FULL shape, no max(1, .) clamp
    k = num_selected(fraction, min(m, n))
    for rec in log:
        ratio = (rec["w_new"] - rec["w"]).norm() / (eta * math.sqrt(k))
        assert 0.9 <= ratio <= 1.1
    assert adjusted_lr_factor("spectral_norm", (16, 32)) == pytest.approx(math.sqrt(0.5))
    assert adjusted_lr_factor("rms_norm", (48, 16)) == pytest.approx(0.2 * math.sqrt(48))
    assert adjusted_lr_factor(None, (48, 16)) == 1.0


def test_fraction_one_equals_muon_without_nesterov() -> None:
    shape, mu, lr = (16, 32), 0.9, 0.02
    grads = _grads(shape, 5)
    w_d, opt_d, _ = _run(shape, grads, lr=lr, fraction=1.0, ef_decay=mu)
    torch.manual_seed(0)
    w_m = torch.nn.Parameter(torch.randn(shape) * 0.1)
    opt_m = Muon([w_m], lr=lr, mu=mu, nesterov=False)
    for g in grads:
        w_m.grad = g
        opt_m.step()
    assert (w_d - w_m).abs().max() <= 2e-4
    assert torch.equal(opt_d.state[w_d]["momentum"], mu * opt_m.state[w_m]["momentum"])


def test_power_of_two_scale_and_transpose_equivariance() -> None:
    shape = (16, 40)
    grads = _grads(shape, 3)
    w_ref, _, _ = _run(shape, grads, fraction=0.3)
    w_scaled, _, _ = _run(shape, [g * 8 for g in grads], fraction=0.3)
    assert torch.equal(w_ref, w_scaled)
    w_rms, _, _ = _run(shape, grads, fraction=0.3, adjust_lr="rms_norm")
    torch.manual_seed(0)
    w_t = torch.nn.Parameter((torch.randn(shape) * 0.1).T.contiguous())
    opt_t = Dion2([w_t], fraction=0.3, adjust_lr="rms_norm")
    for g in grads:
        w_t.grad = g.T.contiguous()
        opt_t.step()
    assert torch.equal(w_t.T, w_rms)


def test_megabatch_and_split_rows_are_transparent() -> None:
    grads = _grads((3, 8, 32), 3)
    torch.manual_seed(0)
    init = torch.randn(3, 8, 32)
    together = [torch.nn.Parameter(init[i].clone()) for i in range(3)]
    alone = [torch.nn.Parameter(init[i].clone()) for i in range(3)]
    fused = torch.nn.Parameter(init.reshape(24, 32).clone())  # fused "QKV": three 8x32 row blocks
    opt_together = Dion2(together, fraction=0.5)
    opt_alone = [Dion2([p], fraction=0.5) for p in alone]
    opt_fused = Dion2([{"params": [fused], "split_rows": 3}], fraction=0.5)
    for g in grads:
        for i in range(3):
            together[i].grad, alone[i].grad = g[i], g[i]
        fused.grad = g.reshape(24, 32)
        opt_together.step(), opt_fused.step(), [o.step() for o in opt_alone]
    for i in range(3):
        assert (together[i] - alone[i]).abs().max() <= 1e-6
        assert torch.equal(fused.detach()[8 * i : 8 * (i + 1)], together[i].detach())


def test_no_grad_params_untouched_and_state_prepopulated() -> None:
    a, b = torch.nn.Parameter(torch.randn(8, 16)), torch.nn.Parameter(torch.randn(8, 16))
    bias = torch.nn.Parameter(torch.randn(8))
    opt = Dion2([{"params": [a, b]}, {"params": [bias], "algorithm": "adamw"}])
    assert set(opt.state[bias]) == {"momentum", "variance", "step_dev"} and set(opt.state[b]) == {"momentum"}
    b_before = b.detach().clone()
    a.grad = torch.randn(8, 16)
    opt.step()
    assert torch.equal(b, b_before) and torch.all(opt.state[b]["momentum"] == 0)
    assert [g["step"] for g in opt.param_groups] == [1, 1]


def test_scalar_algorithms_closed_form() -> None:
    lr, wd, b1, b2, eps = 0.01, 0.1, 0.8, 0.9, 1e-8
    w0, g = torch.randn(6), torch.randn(6)
    wa, wl = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt = Dion2(
        [{"params": [wa], "algorithm": "adamw", "betas": (b1, b2)}, {"params": [wl], "algorithm": "lion"}],
        lr=lr, weight_decay=wd, epsilon=eps, betas=(b1, b2),
    )
    wa.grad, wl.grad = g, g
    opt.step()
    m, v = (1 - b1) * g, (1 - b2) * g * g
    expected = w0 * (1 - lr * wd) - lr / (1 - b1) * m / (v.sqrt() / math.sqrt(1 - b2) + eps)
    torch.testing.assert_close(wa.detach(), expected, atol=1e-7, rtol=0)
    torch.testing.assert_close(wl.detach(), w0 * (1 - lr * wd) - lr * torch.sign(g), atol=1e-7, rtol=0)
    torch.testing.assert_close(opt.state[wl]["momentum"], (1 - b2) * g)


def test_state_dict_round_trip_is_bit_exact() -> None:
    def make():
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(16, 32)), torch.nn.Parameter(torch.randn(16, 32)),
              torch.nn.Parameter(torch.randn(48, 16)), torch.nn.Parameter(torch.randn(16))]
        opt = Dion2([{"params": ps[:3]}, {"params": ps[3:], "algorithm": "adamw"}], lr=0.02)
        return ps, opt

    grads = [[torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * s + i)) for i, p in
              enumerate(make()[0])] for s in range(4)]

    def steps(ps, opt, gs):
        for g in gs:
            for p, gi in zip(ps, g, strict=True):
                p.grad = gi
            opt.step()

    ps_ref, opt_ref = make()
    steps(ps_ref, opt_ref, grads)
    ps_a, opt_a = make()
    steps(ps_a, opt_a, grads[:2])
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in ps_a], "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert isinstance(saved["opt"]["param_groups"][0]["lr"], float)
    ps_b, opt_b = make()
    with torch.no_grad():
        for p, s in zip(ps_b, saved["params"], strict=True):
            p.copy_(s)
    opt_b.load_state_dict(saved["opt"])
    assert opt_b.state[ps_b[3]]["step_dev"].dtype == torch.float32
    steps(ps_b, opt_b, grads[2:])
    for p_ref, p_b in zip(ps_ref, ps_b, strict=True):
        assert torch.equal(p_ref, p_b)


def test_group_betas_are_honoured() -> None:
    p = torch.nn.Parameter(torch.randn(4))
    opt = Dion2([{"params": [p], "algorithm": "adamw", "betas": (0.5, 0.6)}])
    assert (opt.param_groups[0]["beta1"], opt.param_groups[0]["beta2"]) == (0.5, 0.6)
    assert "betas" not in opt.param_groups[0]


@pytest.mark.parametrize(
    "group, kwargs, error",
    [
        ({}, {"fraction": 0.0}, ValueError),
        ({}, {"fraction": 1.5}, ValueError),
        ({}, {"selection_scope": "row"}, ValueError),
        ({}, {"adjust_lr": "spectral"}, ValueError),
        ({"algorithm": "sgd"}, {}, ValueError),
        ({"split_rows": 3}, {}, ValueError),
        ({}, {"distributed_mesh": "cpu"}, TypeError),
    ],
)
def test_rejects_invalid_settings(group, kwargs, error) -> None:
    with pytest.raises(error):
        Dion2([{"params": [torch.nn.Parameter(torch.randn(8, 16))], **group}], **kwargs)


def test_rejects_vectors_in_dion2_group() -> None:
    with pytest.raises(ValueError, match="ndim"):
        Dion2([torch.nn.Parameter(torch.randn(8))])


def test_orthogonaliser_receives_batched_input() -> None:
    shapes = []

    def spy(x, epsilon):
        shapes.append(tuple(x.shape))
        return orthogonalize(x, eps=epsilon)

    ps = [torch.nn.Parameter(torch.randn(8, 32)) for _ in range(3)]
    opt = Dion2(ps, fraction=0.25, newton_schulz_func=spy)
    for p in ps:
        p.grad = torch.randn(8, 32)
    opt.step()
    assert shapes == [(3, 2, 32)]
