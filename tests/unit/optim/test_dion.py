"""Native Dion (v1): the upstream CPU fixture and the invariants of docs/specs/dion.md §4 (single process)."""

from __future__ import annotations

import base64
import copy
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from neobert_pt.optim.dion import Dion, DionMixedPrecisionConfig, compressed_sync_saves, dion_rank

FIXTURE = Path(__file__).resolve().parents[2] / "assets" / "specs" / "dion_cpu_reference.json"
REF = json.loads(FIXTURE.read_text())
NAMES = REF["setup"]["param_order"]
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def _decode(entry: dict) -> torch.Tensor:
    raw = np.frombuffer(base64.b64decode(entry["f32le_b64"]), "<f4").reshape(entry["shape"])
    return torch.from_numpy(raw.copy())


def _max_abs_up_to_column_sign(q: torch.Tensor, ref: torch.Tensor) -> float:
    q, ref = q.float(), ref.float()
    return torch.minimum((q - ref).abs().amax(dim=0), (q + ref).abs().amax(dim=0)).max().item()


def _build(run: dict) -> tuple[dict[str, torch.nn.Parameter], Dion]:
    params = {n: torch.nn.Parameter(_decode(REF["init"][n])) for n in NAMES}
    kwargs = dict(run["ctor_kwargs"])
    if "mixed_precision_config" in kwargs:
        kwargs["mixed_precision_config"] = DionMixedPrecisionConfig(
            **{k: DTYPES[v] for k, v in kwargs["mixed_precision_config"].items()})
    groups = [{**g, "params": [params[n] for n in g["params"]]} for g in run["groups"]]
    return params, Dion(groups, **kwargs)


# ------------------------------------------------------------------------------------------------ fixture
@pytest.mark.parametrize("name", sorted(REF["runs"]))
def test_reproduces_upstream_fixture(name: str) -> None:
    run = REF["runs"][name]
    tol = REF["tolerances"]["bf16_runs" if "bf16" in name else "fp32_runs"]
    params, opt = _build(run)
    mp = run["ctor_kwargs"].get("mixed_precision_config", {})
    m_dtype, q_dtype = DTYPES[mp.get("momentum_dtype", "float32")], DTYPES[mp.get("Q_dtype", "float32")]
    for n, q_init in run["Q_init"].items():
        # The rank rule and orientation produce the Q shape upstream created lazily.
        assert tuple(opt.state[params[n]]["Q"].shape) == tuple(q_init["shape"]), n
        opt.state[params[n]]["momentum"] = torch.zeros_like(params[n], dtype=m_dtype)
        opt.state[params[n]]["Q"] = _decode(q_init).to(q_dtype)
    skip = {tuple(s) for s in run["skip_grads"]}
    # Lion (neobert_pt/optim/scalar_opts.py, shared with Muon/Dion2) is upstream's arithmetic: exact, bf16 included.
    lion = {n for g in run["groups"] if g.get("algorithm") == "lion" for n in g["params"]}
    for step, expected in enumerate(run["steps"]):
        before = {n: params[n].detach().clone() for n in NAMES}
        for n in NAMES:
            params[n].grad = None if (step, n) in skip else _decode(REF["grads"][step][n])
        opt.step()
        for n in NAMES:
            if (step, n) in skip:
                assert torch.equal(params[n].detach(), before[n]), (name, step, n)
            bound = 0.0 if n in lion else tol["params_abs"] if params[n].ndim == 2 or "bf16" in name else 1e-7
            diff = (params[n].detach() - _decode(expected["params"][n])).abs().max().item()
            assert diff <= bound, (name, step, n, diff)
        for n, entry in expected["momentum"].items():
            momentum = opt.state[params[n]]["momentum"]
            assert momentum.dtype == DTYPES[entry["dtype"]], (name, n)
            diff = (momentum.float() - _decode(entry)).abs().max().item()
            assert diff <= tol["momentum_abs"], (name, step, n, diff)
            q = opt.state[params[n]]["Q"]
            assert q.dtype == DTYPES[expected["Q"][n]["dtype"]]
            diff = _max_abs_up_to_column_sign(q, _decode(expected["Q"][n]))
            assert diff <= tol["Q_abs_up_to_column_sign"], (name, step, n, diff)
        for n in lion & set(expected["scalar_state"]):
            ref = _decode(expected["scalar_state"][n]["momentum"])
            assert torch.equal(opt.state[params[n]]["momentum"].float(), ref), (name, step, n)
        if "bf16" not in name:
            for n, state in expected["scalar_state"].items():
                for key, entry in state.items():
                    ref = _decode(entry)  # AdamW/Lion states: 2 ulps (upstream forms m and v with other fp32 ops)
                    diff = (opt.state[params[n]][key] - ref).abs().max().item()
                    assert diff <= 2.5e-7 * max(1.0, ref.abs().max().item()), (name, step, n, key, diff)
    assert {n: sorted(opt.state[params[n]]) for n in NAMES} == run["state_keys"]
    saved = opt.state_dict()["param_groups"]
    for got, want in zip(saved, run["param_groups_after"], strict=True):
        assert {k: got[k] for k in want} == want


def test_frobenius_identity_matches_the_fixture_diagnostics() -> None:
    """‖(W_t − (1−ηλ)W_{t−1})/η̃‖_F² = r at every step (docs/specs/dion.md §1.12 item 3)."""
    run = REF["runs"]["dion_f0.5"]
    params, opt = _build(run)
    for n, q_init in run["Q_init"].items():
        opt.state[params[n]]["Q"] = _decode(q_init)
    lr, wd = 0.01, 0.01
    for step, expected in enumerate(run["steps"]):
        before = {n: params[n].detach().clone() for n in NAMES}
        for n in NAMES:
            params[n].grad = _decode(REF["grads"][step][n])
        opt.step()
        for n, diag in expected["diagnostics"].items():
            m, k = params[n].shape
            direction = (params[n].detach() - (1 - lr * wd) * before[n]) / (lr * math.sqrt(m / k))
            assert direction.square().sum().item() == pytest.approx(diag["update_direction_fro_sq"], rel=1e-4)
            assert direction.square().sum().item() == pytest.approx(12, rel=1e-2)


# ------------------------------------------------------------------------------------------------ invariants
def _matrix_opt(w: torch.nn.Parameter, **kw) -> Dion:
    return Dion([w], lr=kw.pop("lr", 0.01), **kw)


@pytest.mark.parametrize(("f", "k", "m", "n", "r"), [
    (0.28, 1, 25, 40, 8), (0.14, 1, 50, 60, 8), (0.07, 1, 100, 100, 8), (0.5, 8, 24, 40, 16),
    (1.0, 1, 56, 24, 24), (0.25, 1, 768, 3072, 192), (0.5, 128, 100, 300, 100),
])
def test_rank_rule_in_double_arithmetic(f: float, k: int, m: int, n: int, r: int) -> None:
    assert dion_rank(f, k, m, n) == r
    opt = _matrix_opt(torch.nn.Parameter(torch.zeros(m, n)), rank_fraction=f, rank_multiple_of=k)
    assert tuple(opt.state[opt.param_groups[0]["params"][0]]["Q"].shape) == (min(m, n), r)


@pytest.mark.parametrize("bad", [{"rank_fraction": 0.0}, {"rank_fraction": 1.5}, {"rank_multiple_of": 0},
                                 {"lr": -1.0}, {"mu": -0.1}, {"weight_decay": -0.1}, {"qr_method": "svd"},
                                 {"power_iters": 0}])
def test_bad_hyperparameters_raise(bad: dict) -> None:
    with pytest.raises(ValueError):
        _matrix_opt(torch.nn.Parameter(torch.zeros(8, 4)), **bad)


def test_errors_for_vectors_unknown_algorithms_and_tensor_parallelism() -> None:
    with pytest.raises(ValueError, match="2-D"):
        Dion([torch.nn.Parameter(torch.zeros(4))])
    with pytest.raises(ValueError, match="Unknown algorithm"):
        Dion([{"params": [torch.nn.Parameter(torch.zeros(4))], "algorithm": "sgd"}])
    with pytest.raises(NotImplementedError):
        Dion([torch.nn.Parameter(torch.zeros(4, 4))], inner_shard_mesh=object())
    with pytest.raises(TypeError):
        Dion([torch.nn.Parameter(torch.zeros(4, 4))], replicate_mesh="dp")


def test_per_group_betas_are_mapped_not_ignored() -> None:
    opt = Dion([{"params": [torch.nn.Parameter(torch.zeros(3))], "algorithm": "adamw", "betas": (0.8, 0.7)}])
    assert (opt.param_groups[0]["beta1"], opt.param_groups[0]["beta2"]) == (0.8, 0.7)


def _gauss(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(48, 20), (20, 48), (24, 24)])
@pytest.mark.parametrize("fraction", [1.0, 0.25])
def test_svd_oracle_on_the_first_step(shape: tuple[int, int], fraction: float) -> None:
    """Q_0 = top-r singular vectors on the short side ⇒ direction U_r V_rᵀ, M_1 = G − (1−μ)U_r Σ_r V_rᵀ
    (docs/specs/dion.md §1.12.4)."""
    m, n = shape
    g = _gauss(shape, 1)
    u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    r = dion_rank(fraction, 1, m, n)
    w = torch.nn.Parameter(torch.zeros(shape))
    opt = _matrix_opt(w, rank_fraction=fraction, weight_decay=0.0, lr=1.0)
    opt.state[w]["Q"] = (u[:, :r] if m < n else vh[:r].T).float().contiguous()
    w.grad = g
    opt.step()
    direction = -w.detach().double() / math.sqrt(m / n)
    assert (direction - u[:, :r] @ vh[:r]).abs().max() <= 1e-5
    expected_m = g.double() - 0.05 * (u[:, :r] * s[:r]) @ vh[:r]
    assert (opt.state[w]["momentum"].double() - expected_m).abs().max() <= 1e-5
    if fraction == 1.0:
        # At full rank the update is the polar factor UVᵀ: orthonormal on the short side.
        short = direction.T @ direction if m >= n else direction @ direction.T
        assert (short - torch.eye(min(m, n), dtype=torch.float64)).abs().max() <= 1e-5


def _replay(shape, steps, seed=0, q0=None, **kw):
    w = torch.nn.Parameter(_gauss(shape, seed) * 0.1)
    opt = _matrix_opt(w, **kw)
    if q0 is not None:
        opt.state[w]["Q"] = q0.clone()
    history = []
    for s in range(steps):
        w.grad = _gauss(shape, 100 + s)
        opt.step()
        history.append((w.detach().clone(), opt.state[w]["momentum"].clone(), opt.state[w]["Q"].clone()))
    return w, opt, history


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_error_feedback_accounting(shape: tuple[int, int]) -> None:
    """Pᵀ M_t = μ·Pᵀ B_t and the mass identity Σ G_t = M_T + (1−μ) Σ P_t R_tᵀ (docs/specs/dion.md §1.5)."""
    m, n = shape
    mu = 0.9
    w = torch.nn.Parameter(_gauss(shape, 0) * 0.1)
    opt = _matrix_opt(w, rank_fraction=0.5, mu=mu)
    grads_sum, captured = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
    for s in range(4):
        g = _gauss(shape, 100 + s)
        b = opt.state[w]["momentum"].double() + g.double()
        w.grad = g
        opt.step()
        m_new = opt.state[w]["momentum"].double()
        removed = (b - m_new) / (1 - mu)  # = P Rᵀ (plain) or R Pᵀ (transposed), rank r
        captured += removed
        grads_sum += g.double()
        r = opt.state[w]["Q"].shape[1]
        assert torch.linalg.matrix_rank(removed, rtol=1e-5).item() == r
        # The captured subspace decays by μ: project B and M_new onto the span of `removed`.
        u = torch.linalg.svd(removed, full_matrices=False).U[:, :r] if m >= n else \
            torch.linalg.svd(removed.T, full_matrices=False).U[:, :r]
        proj_b, proj_m = (u.T @ b, u.T @ m_new) if m >= n else (b @ u, m_new @ u)
        assert (proj_m - mu * proj_b).abs().max() <= 1e-4
    assert (grads_sum - (opt.state[w]["momentum"].double() + (1 - mu) * captured)).abs().max() <= 1e-4


def test_zero_gradient_is_a_pure_decay() -> None:
    w = torch.nn.Parameter(_gauss((20, 12), 0))
    opt = _matrix_opt(w, rank_fraction=0.5, lr=0.1, weight_decay=0.2)
    q0 = opt.state[w]["Q"].clone()
    before = w.detach().clone()
    w.grad = torch.zeros_like(w)
    opt.step()
    assert torch.equal(w.detach(), before * (1 - torch.tensor(0.1) * 0.2))
    assert torch.equal(opt.state[w]["momentum"], torch.zeros_like(w))
    assert torch.allclose(opt.state[w]["Q"], q0 / (q0.square().sum(0, keepdim=True).sqrt() + 1e-8))


def test_scale_invariance_and_transpose_equivariance() -> None:
    shape = (36, 20)
    base, opt_a, _ = _replay(shape, 3, rank_fraction=0.5)
    w = torch.nn.Parameter(_gauss(shape, 0) * 0.1)
    opt = _matrix_opt(w, rank_fraction=0.5)
    for s in range(3):
        w.grad = 7.0 * _gauss(shape, 100 + s)
        opt.step()
    assert (w.detach() - base.detach()).abs().max() <= 1e-6
    # Transpose: run on Wᵀ with η' = η·m/n, λ' = λ·n/m and the same Q_0.
    m, n = shape
    wt = torch.nn.Parameter((_gauss(shape, 0) * 0.1).T.contiguous())
    opt_t = Dion([wt], lr=0.01 * m / n, weight_decay=0.01 * n / m, rank_fraction=0.5)
    q0 = _gauss((n, dion_rank(0.5, 1, m, n)), 9)  # the short side: Q of W (plain) and of Wᵀ (transposed)
    opt_t.state[wt]["Q"] = q0.clone()
    ref = torch.nn.Parameter(_gauss(shape, 0) * 0.1)
    opt_ref = Dion([ref], lr=0.01, rank_fraction=0.5)
    opt_ref.state[ref]["Q"] = q0.clone()
    for s in range(3):
        ref.grad = _gauss(shape, 100 + s)
        wt.grad = ref.grad.T.contiguous()
        opt_ref.step()
        opt_t.step()
    assert (wt.detach().T - ref.detach()).abs().max() <= 1e-6


def test_sketch_and_qr_method_independence() -> None:
    shape = (48, 20)
    q0 = _gauss((20, 10), 3)  # same initial Q; only the sketch / QR algorithm differ
    _, _, a = _replay(shape, 4, q0=q0, rank_fraction=0.5, sketch_seed=0)
    for kw in ({"sketch_seed": 7}, {"qr_method": "qr"}, {"qr_method": "cqr", "cqr_warmup_steps": 2}):
        _, _, b = _replay(shape, 4, q0=q0, rank_fraction=0.5, **kw)
        for (wa, ma, qa), (wb, mb, qb) in zip(a, b, strict=True):
            assert (wa - wb).abs().max() <= 1e-6, kw
            assert (ma - mb).abs().max() <= 2e-5, kw
            assert _max_abs_up_to_column_sign(qa, qb) <= 2e-5, kw


def test_deterministic_and_global_rng_untouched() -> None:
    torch.manual_seed(3)
    expected_next = torch.rand(1)
    torch.manual_seed(3)
    _, _, a = _replay((48, 20), 3, rank_fraction=0.5)
    assert torch.equal(torch.rand(1), expected_next)  # the training loop's random stream is not consumed
    _, _, b = _replay((48, 20), 3, rank_fraction=0.5)
    for x, y in zip(a, b, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(x, y, strict=True))


def _two_layer(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(40, 24), torch.nn.Linear(24, 56))
    groups = [{"params": [model[0].weight, model[1].weight]},
              {"params": [model[0].bias, model[1].bias], "algorithm": "adamw"}]
    return model, groups


def _train(model, opt, steps, start=0):
    for s in range(start, start + steps):
        for i, p in enumerate(model.parameters()):
            p.grad = _gauss(p.shape, 1000 * s + i)
        opt.step()


@pytest.mark.parametrize("mixed", [False, True])
def test_state_dict_round_trip_is_bit_exact(mixed: bool) -> None:
    mp = DionMixedPrecisionConfig(torch.bfloat16, torch.bfloat16) if mixed else None
    algo = "lion" if mixed else "adamw"
    model, groups = _two_layer()
    groups[1]["algorithm"] = algo
    opt = Dion(groups, rank_fraction=0.5, mixed_precision_config=mp)
    _train(model, opt, 2)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, 2, start=2)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2, groups2 = _two_layer(seed=1)
    groups2[1]["algorithm"] = algo
    model2.load_state_dict(saved["model"])
    opt2 = Dion(groups2, rank_fraction=0.5, mixed_precision_config=mp)
    opt2.load_state_dict(saved["opt"])
    if mixed:  # torch would up-cast to the param dtype; the configured bf16 survives
        assert opt2.state[model2[0].weight]["momentum"].dtype == torch.bfloat16
        assert opt2.state[model2[0].weight]["Q"].dtype == torch.bfloat16
    _train(model2, opt2, 2, start=2)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_loads_an_upstream_layout_state_and_reinitialises_a_misfit_q(caplog) -> None:
    """An upstream ``dion.Dion`` state dict (keys momentum/Q, no extra keys) loads and is used as is."""
    model, groups = _two_layer()
    opt = Dion(groups, rank_fraction=0.5)
    _train(model, opt, 1)
    upstream = copy.deepcopy(opt.state_dict())
    assert sorted(upstream["state"][1]) == ["Q", "momentum"] and sorted(upstream["state"][2]) == ["momentum", "variance"]
    q_loaded = upstream["state"][1]["Q"].clone()  # 1.weight (56×24, plain): Q is (24, 12)
    model2, groups2 = _two_layer()
    opt2 = Dion(groups2, rank_fraction=0.5)
    opt2.load_state_dict(upstream)
    assert torch.equal(opt2.state[model2[1].weight]["Q"], q_loaded)
    # A Q from another orientation (e.g. written under FSDP2 Shard(0): (m, r) for a tall matrix) is re-initialised.
    upstream["state"][1]["Q"] = torch.zeros(56, 12)
    opt3 = Dion(_two_layer()[1], rank_fraction=0.5)
    with caplog.at_level("WARNING"):
        opt3.load_state_dict(upstream)
    assert tuple(opt3.state[opt3.param_groups[0]["params"][1]]["Q"].shape) == (24, 12)
    assert "re-initialising Q" in caplog.text


def test_params_without_grad_are_untouched_and_adamw_uses_the_group_step() -> None:
    model, groups = _two_layer()
    opt = Dion(groups, rank_fraction=0.5)
    _train(model, opt, 2)
    frozen = {n: (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
              for n, p in model.named_parameters()}
    model[1].weight.grad = None
    model[0].bias.grad = None
    model[0].weight.grad = _gauss((24, 40), 5)
    model[1].bias.grad = _gauss((56,), 6)
    opt.step()
    for n in ("1.weight", "0.bias"):
        p = dict(model.named_parameters())[n]
        assert torch.equal(p.detach(), frozen[n][0])
        assert all(torch.equal(opt.state[p][k], v) for k, v in frozen[n][1].items())
    assert opt.param_groups[1]["step"] == 3


def test_compressed_sync_rule_matches_the_spec_example() -> None:
    """768×3072: compression while r < 614.4 (rank fraction < 0.8); ratio (m+n)r/(mn) = 0.3125 at r = 192."""
    assert compressed_sync_saves(768, 3072, 192) and compressed_sync_saves(768, 3072, 614)
    assert not compressed_sync_saves(768, 3072, 615) and not compressed_sync_saves(24, 24, 24)
    assert (768 + 3072) * 192 / (768 * 3072) == 0.3125
    run = REF["runs"]["dion_f0.5_mult8_mu0.9_wd0.1_lr0.02"]
    for info in run["matrices"].values():
        m, n = info["shape"]
        assert compressed_sync_saves(m, n, info["r"]) == info["compressed_all_reduce_if_replicated"]
