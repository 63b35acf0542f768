"""The ``dion`` registry builder: routing of NeoBERT parameters, the LM-head LR rule, dtypes, bad mesh settings."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from neobert_pt.config.errors import ConfigError
from neobert_pt.modeling.configuration_neobert import NeoBERTConfig
from neobert_pt.modeling.modeling_neobert import NeoBERTForMaskedLM
from neobert_pt.optim.config import OptimizerConfig
from neobert_pt.optim.dion import Dion
from neobert_pt.optim.registry import OptimizerContext, build_optimizer


def _model(tie: bool = True) -> NeoBERTForMaskedLM:
    torch.manual_seed(0)
    cfg = NeoBERTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, tie_word_embeddings=tie)
    return NeoBERTForMaskedLM(cfg)


def _build(model=None, mesh=None, **dion):
    model = model or _model()
    cfg = OptimizerConfig(name="dion", lr=6e-4, weight_decay=0.01)
    for key, value in dion.items():
        setattr(cfg.dion_config, key, value)
    return model, build_optimizer(OptimizerContext(model=model, config=cfg, max_steps=10, distributed_mesh=mesh))


def test_routes_block_matrices_to_dion_and_the_rest_to_adamw_without_decay() -> None:
    model, built = _build()
    opt = built.optimizer
    assert isinstance(opt, Dion) and built.qk_clip is None
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            is_block_matrix = ".layers." in names[id(p)] and p.ndim == 2
            assert group["algorithm"] == ("dion" if is_block_matrix else "adamw"), names[id(p)]
            assert group["weight_decay"] == (0.01 if is_block_matrix else 0.0)
    qkv = next(p for n, p in model.named_parameters() if n.endswith("layers.0.attention.qkv.weight"))
    # Fused QKV (96×32, tall) is one Dion matrix: Q is (32, r) with r = 0.5·32.
    assert tuple(opt.state[qkv]["Q"].shape) == (32, 16)
    assert any("dion group qkv: dion lr=0.0006" in line for line in built.log_lines)


def test_matrix_lr_dtypes_and_lion_scalars() -> None:
    _, built = _build(matrix_lr=0.02, scalar_algorithm="lion", momentum_dtype="bfloat16", q_dtype="bfloat16",
                      rank_fraction=0.25)
    opt = built.optimizer
    dion_groups = [g for g in opt.param_groups if g["algorithm"] == "dion"]
    assert dion_groups and all(g["lr"] == 0.02 and g["rank_fraction"] == 0.25 for g in dion_groups)
    assert {g["algorithm"] for g in opt.param_groups} == {"dion", "lion"}
    p = dion_groups[0]["params"][0]
    assert opt.state[p]["momentum"].dtype == torch.bfloat16 and opt.state[p]["Q"].dtype == torch.bfloat16


@pytest.mark.parametrize(("scalar", "scale"), [("lion", 1 / math.sqrt(32)), ("adamw", 1.0)])
def test_untied_head_gets_upstreams_lr_rule(scalar: str, scale: float) -> None:
    model, built = _build(model=_model(tie=False), scalar_algorithm=scalar)
    head = [g for g in built.optimizer.param_groups if any(p is model.lm_head.weight for p in g["params"])]
    assert len(head) == 1 and head[0]["params"] == [model.lm_head.weight]
    assert head[0]["lr"] == pytest.approx(6e-4 * scale) and head[0]["weight_decay"] == 0.0
    _, plain = _build(model=_model(tie=False), scalar_algorithm=scalar, lm_head_lr_rule="none")
    assert all(g["lr"] == 6e-4 for g in plain.optimizer.param_groups)


def test_replicate_sync_true_without_an_hsdp_mesh_is_one_clear_line(tmp_path) -> None:
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
    try:
        with pytest.raises(ConfigError) as err:
            _build(mesh=dist.group.WORLD, replicate_mesh_grad_sync=True)
        msg = str(err.value)
        assert "\n" not in msg and "replicate_mesh_grad_sync=true needs a 2-D" in msg and "DDP" in msg
        _, built = _build(mesh=dist.group.WORLD)  # null: Dion leaves the averaging to DDP
        assert not built.optimizer.syncs_replicas
    finally:
        dist.destroy_process_group()
