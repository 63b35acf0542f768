"""QK-clip across 2 gloo processes, each rank observing a different batch.

DDP: after the clip step the parameters are bit-identical on both ranks and equal to one process that observed the
union of the two batches (max statistic: bit-exact; mean: ≤1e-6 relative, its fp64 sums run in another order).
FSDP2 (``fully_shard`` per layer + root; hidden 30 → qkv 90 rows, 45 per rank, so layer 0's head-1 K rows 40..49
straddle the shard boundary): the replay calls each layer as a module, so FSDP2's own hooks gather and free its
parameters (also with ``reshard_after_forward=False``, with train/distributed.py's grouped unit for the embedding,
tied head and final norm, and when only the root is sharded: QK-clip then gathers the root itself); the gathered
weights equal the same single-process result bit-for-bit, every unit is sharded again after the clip, and a forward
pass through the sharded model has every head's max logit ≤ τ.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from gloo import run_on_gloo  # tests/distributed/gloo.py (the test dir is on sys.path)

WORLD = 2
TIMEOUT_S = 120
TAU = 3.0
H, N_HEADS, D = 30, 3, 10
STEP = 4  # clip step: warmup 2, interval 2


def _model():
    from neobert_pt.modeling import NeoBERTConfig, NeoBERTForMaskedLM

    torch.manual_seed(0)
    cfg = NeoBERTConfig(
        vocab_size=64, hidden_size=H, num_hidden_layers=2, num_attention_heads=N_HEADS, intermediate_size=64
    )
    model = NeoBERTForMaskedLM(cfg).eval()
    with torch.no_grad():  # logits of layer 0 head 1 (the straddling head) and layer 1 head 2 far above tau
        for layer, head, factor in ((0, 1, 14.0), (1, 2, 12.0)):
            w = model.model.layers[layer].attention.qkv.weight
            w[head * D : (head + 1) * D] *= factor
            w[H + head * D : H + (head + 1) * D] *= factor
    return model


def _batch(rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + rank)
    ids = torch.randint(1, 64, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _union() -> dict[str, torch.Tensor]:
    parts = [_batch(r) for r in range(WORLD)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _reshard(model) -> None:
    """Free every FSDP2 unit's gathered parameters (``reshard_after_forward=False`` keeps them after a forward), so
    what follows sees the sharded parameters that the optimizer and checkpoints hold."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@torch.no_grad()
def _fake_update(model) -> None:
    """Stand-in for backward + optimizer.step(), identical on every rank and valid on shards (elementwise); the
    backward would have resharded the FSDP2 units."""
    _reshard(model)
    for layer in model.model.layers:
        layer.attention.qkv.weight.mul_(1.05)


def _qk_clip(model, **kw):
    from neobert_pt.optim.qk_clip import QKClip

    return QKClip(model, threshold=TAU, alpha=0.5, interval=2, warmup_steps=2, **{"statistic": "max", **kw})


def _clip_step(model, forward, inputs, clip=None, **kw) -> dict[str, float]:
    clip = clip or _qk_clip(model, **kw)
    forward_kwargs = clip.begin_step(STEP, logging=False)
    with torch.no_grad():
        clip.record(inputs, forward(**inputs, **forward_kwargs))
    _fake_update(model)
    return clip.after_step(STEP)


@torch.no_grad()
def _max_logits(forward, attentions, inputs) -> torch.Tensor:
    """(L, nH) dense max logit over allowed pairs during a normal forward: a forward pre-hook on each attention
    recomputes q, k from its (gathered) ``qkv`` and RoPE; the mask is built here from the batch's attention mask."""
    from neobert_pt.modeling.modeling_neobert import apply_rotary

    real = inputs["attention_mask"].bool()
    allowed = (real[:, :, None] & real[:, None, :])[:, None]  # (B, 1, T, T): one document per row
    out = []

    def dense(attn, args):
        hidden, (cos, sin) = args[0], args[1]
        b, t, _ = hidden.shape
        q, k, _ = attn.qkv(hidden).view(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        logits = q @ k.transpose(-1, -2) / attn.head_dim**0.5
        out.append(logits.masked_fill(~allowed, float("-inf")).amax(dim=(0, 2, 3)))

    hooks = [a.register_forward_pre_hook(dense) for a in attentions]
    try:
        forward(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(out)


def _qkv(model) -> list[torch.Tensor]:
    _reshard(model)  # the sharded parameters, not a gathered copy left over from a forward
    ws = [layer.attention.qkv.weight.detach() for layer in model.model.layers]
    return [w.full_tensor() if hasattr(w, "full_tensor") else w.clone() for w in ws]


def _work(rank: int, out_dir: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    model = _model()
    ddp = DistributedDataParallel(model)
    ddp_metrics = _clip_step(model, ddp, _batch(rank), process_group=dist.group.WORLD)
    ddp_qkv = _qkv(model)
    model = _model()
    _clip_step(model, DistributedDataParallel(model), _batch(rank), process_group=None, statistic="mean")
    ddp_mean_qkv = _qkv(model)

    mesh = init_device_mesh("cpu", (WORLD,))
    fsdp = {}
    # per-layer units; units that keep their gathered parameters after a forward; the root alone (layers are not
    # units: QK-clip gathers the root around each layer call; that QKClip is built before the model is sharded, so
    # nothing it needs may be looked up at construction); and train/distributed.py's wrapping: blocks, one grouped
    # unit for the ends (embedding = tied head, final norm) kept gathered after a forward, then the root
    modes = (("fsdp", True, True), ("fsdp_keep", True, False), ("fsdp_root", False, True), ("fsdp_ends", True, True))
    for name, per_layer, reshard in modes:
        model = _model()
        early = _qk_clip(model, process_group=mesh) if name == "fsdp_root" else None
        if per_layer:
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
        if name == "fsdp_ends":
            ends = [model.model.final_norm, model.get_input_embeddings(), model.get_output_embeddings()]
            fully_shard(list(dict.fromkeys(ends)), mesh=mesh, reshard_after_forward=False)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
        fsdp[f"{name}_local_rows"] = model.model.layers[0].attention.qkv.weight.to_local().shape[0]
        fsdp[f"{name}_metrics"] = _clip_step(model, model, _batch(rank), clip=early, process_group=mesh)
        # The clip leaves every unit sharded: a hooked call of the grouped unit's embedding alone would leave that
        # unit mid-forward (its reshard() a no-op; torch 2.11 then skipped the next training forward's gather).
        fsdp[f"{name}_sharded"] = all(isinstance(p, DTensor) for p in model.parameters())
        _reshard(model)  # the check below gathers the clipped shards afresh
        attentions = [layer.attention for layer in model.model.layers]
        fsdp[f"{name}_post"] = _max_logits(model, attentions, _batch(rank))
        fsdp[name] = _qkv(model)
    return {"ddp": ddp_qkv, "ddp_metrics": ddp_metrics, "ddp_mean": ddp_mean_qkv, **fsdp}


@pytest.mark.distributed
@pytest.mark.timeout(TIMEOUT_S + 30)
def test_qk_clip_ddp_and_fsdp2_match_one_process_on_the_union_batch(tmp_path) -> None:
    results = run_on_gloo(_work, tmp_path, world=WORLD, timeout_s=TIMEOUT_S, what="distributed QK-clip run")

    torch.set_num_threads(1)
    reference = _model()
    ref_metrics = _clip_step(reference, reference, _union())
    ref_qkv = _qkv(reference)
    assert ref_metrics["train/qk_clip_heads_clipped"] == 2.0
    attentions = [layer.attention for layer in reference.model.layers]
    assert (_max_logits(reference, attentions, _union()) <= TAU * (1 + 1e-3)).all()

    fsdp_modes = ("fsdp", "fsdp_keep", "fsdp_root", "fsdp_ends")
    for mode in fsdp_modes:  # odd shard: head 1's K rows straddle rows 45
        assert [r[f"{mode}_local_rows"] for r in results] == [45, 45]
        assert [r[f"{mode}_sharded"] for r in results] == [True, True], mode
    for r, res in enumerate(results):
        for mode in ("ddp", *fsdp_modes):
            for layer, (w, w_ref) in enumerate(zip(res[mode], ref_qkv, strict=True)):
                assert torch.equal(w, w_ref), (mode, r, layer)
            for key, value in ref_metrics.items():
                assert res[f"{mode}_metrics"][key] == pytest.approx(value, rel=1e-6), (mode, r, key)
        for mode in fsdp_modes:
            assert (res[f"{mode}_post"] <= TAU * (1 + 1e-3)).all(), (mode, res[f"{mode}_post"])
    # statistic="mean" reduces (Σ row maxima, rows) with SUM; process_group=None falls back to WORLD.
    mean_ref = _model()
    _clip_step(mean_ref, mean_ref, _union(), statistic="mean")
    for res in results:
        for w, w_ref in zip(res["ddp_mean"], _qkv(mean_ref), strict=True):
            torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=0)
        assert not all(torch.equal(a, b) for a, b in zip(res["ddp_mean"], ref_qkv, strict=True))
    # Replicas identical: both ranks hold the same full weights after the clip.
    for mode in ("ddp", *fsdp_modes, "ddp_mean"):
        assert all(torch.equal(a, b) for a, b in zip(results[0][mode], results[1][mode], strict=True))
