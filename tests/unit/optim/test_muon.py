"""Muon optimizer: upstream fixture parity, update scale, per-projection QKV, state round trip, muonclip routing."""

from __future__ import annotations

import base64
import copy
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
def fixture(assets_dir_module) -> dict:
    with open(os.path.join(assets_dir_module, "specs", "dion2_cpu_reference.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def assets_dir_module() -> str:
    return os.path.join(os.path.dirname(__file__), "..", "..", "assets")


def decode(entry: dict) -> torch.Tensor:
    raw = np.frombuffer(base64.b64decode(entry["f32le_b64"]), "<f4").reshape(entry["shape"])
    return torch.from_numpy(raw.copy())


def _fixture_optimizer(params: dict[str, nn.Parameter], kwargs: dict) -> Muon:
    """The fixture's setup in our vocabulary: upstream ``mu`` is ``momentum``, ``use_polar_express=False`` is NS5."""
    ours = dict(lr=kwargs["lr"], momentum=kwargs["mu"], weight_decay=kwargs["weight_decay"],
                nesterov=kwargs.get("nesterov", False))
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
