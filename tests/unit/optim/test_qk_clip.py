"""QK-clip on a tiny real NeoBERT: the Kimi bound after the clip, exact per-head factors, schedule, masks.

Every "measured" logit below comes from an independent dense reference: a forward pre-hook on each attention module
recomputes q, k from its ``qkv`` and RoPE, and takes the full ``q·kᵀ/√d`` matrix of each head under a mask built
here from the batch (same document, real tokens); no chunking, no QK-logit API, no QKClip code.
"""

from __future__ import annotations

import pytest
import torch

from neobert_pt.modeling import NeoBERTConfig, NeoBERTForMaskedLM
from neobert_pt.modeling.modeling_neobert import apply_rotary
from neobert_pt.optim.qk_clip import QKClip, is_clip_step

H, N_HEADS, D = 32, 2, 16


def tiny_model(seed: int = 0) -> NeoBERTForMaskedLM:
    torch.manual_seed(seed)
    cfg = NeoBERTConfig(
        vocab_size=64, hidden_size=H, num_hidden_layers=2, num_attention_heads=N_HEADS, intermediate_size=64
    )
    model = NeoBERTForMaskedLM(cfg).eval()
    with torch.no_grad():  # blow up layer 0 head 1 and layer 1 head 0 so their logits are far above the rest
        for layer, head, factor in ((0, 1, 12.0), (1, 0, 9.0)):
            w = model.model.layers[layer].attention.qkv.weight
            w[head * D : (head + 1) * D] *= factor
            w[H + head * D : H + (head + 1) * D] *= factor
    return model


def batch(seed: int, rows: int = 3, t: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (rows, t), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, t // 2 :] = 0  # a padded row
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def row_maxima(model: NeoBERTForMaskedLM, inputs: dict, *, all_pairs: bool = False) -> torch.Tensor:
    """(L, B, nH) dense per-row max logit over allowed pairs (all non-pad pairs if ``all_pairs``)."""
    real = inputs["attention_mask"].bool()
    docs = inputs.get("document_ids", torch.zeros_like(inputs["input_ids"]))
    allowed = real[:, :, None] & real[:, None, :]
    if not all_pairs:  # else every real query/key pair, ignoring document boundaries
        allowed &= docs[:, :, None] == docs[:, None, :]
    out = []

    def dense(attn, args):
        hidden, (cos, sin) = args[0], args[1]
        b, t, _ = hidden.shape
        q, k, _ = attn.qkv(hidden).view(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        logits = q @ k.transpose(-1, -2) / attn.head_dim**0.5  # (B, nH, T, T)
        out.append(logits.masked_fill(~allowed[:, None], float("-inf")).amax(dim=(-1, -2)))

    hooks = [layer.attention.register_forward_pre_hook(dense) for layer in model.model.layers]
    try:
        model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(out)


def layerwise_pre_clip(clipped, unclipped, micro_batches) -> torch.Tensor:
    """(L, rows, nH) row maxima as QKClip defines its statistic: layer l with its pre-clip weights, fed by the
    already-clipped layers < l (each layer's qkv swapped back in turn)."""
    out = []
    for i in range(len(clipped.model.layers)):
        hybrid = tiny_model()
        hybrid.load_state_dict(clipped.state_dict())
        hybrid.model.layers[i].attention.qkv.weight.data.copy_(unclipped.model.layers[i].attention.qkv.weight)
        out.append(torch.cat([row_maxima(hybrid, mb)[i] for mb in micro_batches]))
    return torch.stack(out)


def qkv(model: NeoBERTForMaskedLM, layer: int) -> torch.Tensor:
    return model.model.layers[layer].attention.qkv.weight.detach().clone()


def run_step(clip: QKClip, model, micro_batches, step: int, logging: bool = False, update=None) -> dict:
    forward_kwargs = clip.begin_step(step, logging)
    for mb in micro_batches:
        clip.record(mb, model(**mb, **forward_kwargs))
    if update is not None:
        update(model)
    return clip.after_step(step)


def fake_update(model) -> None:
    """Stand-in for optimizer.step(): raises layer 1 head 1's logits after the forward pass."""
    with torch.no_grad():
        w = model.model.layers[1].attention.qkv.weight
        w[D : 2 * D] *= 12.0
        w[H + D : H + 2 * D] *= 12.0


def make_clip(model, **kw) -> QKClip:
    args = {"threshold": 3.0, "alpha": 0.5, "interval": 1, "warmup_steps": 0, "statistic": "max"}
    return QKClip(model, **{**args, **kw})


def test_clip_bounds_every_head_on_the_post_update_batch_and_leaves_the_rest_bitwise():
    model = tiny_model()
    mbs = [batch(1), batch(2)]
    tau = 3.0
    clip = make_clip(model, threshold=tau)
    before_update = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = run_step(clip, model, mbs, step=1, update=fake_update)

    # Reference statistic, layer by layer as QKClip defines it: layer l measured with the post-update weights on
    # the inputs produced by the already-clipped layers < l.
    ref = tiny_model()
    ref.load_state_dict({**ref.state_dict(), **before_update})
    fake_update(ref)
    pre = layerwise_pre_clip(model, ref, mbs).amax(dim=1)  # (L, nH)
    clipped = pre > tau
    assert clipped.sum() == 3 and (~clipped).any()  # layer0/head1, layer1/head0, layer1/head1 (post-update)
    assert metrics["train/qk_clip_heads_clipped"] == 3.0
    assert metrics["train/max_attention_logit"] == pytest.approx(pre.max().item(), rel=1e-5)
    assert metrics["train/max_attention_logit_post_clip"] == pytest.approx(tau, rel=1e-5)
    for i in range(2):
        assert metrics[f"train/max_attention_logit/layer_{i}"] == pytest.approx(pre[i].max().item(), rel=1e-5)

    post = torch.cat([row_maxima(model, mb) for mb in mbs], dim=1).amax(dim=1)
    assert (post <= tau * (1 + 1e-3)).all()
    torch.testing.assert_close(post[clipped], torch.full_like(post[clipped], tau), rtol=1e-4, atol=0)

    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        if not name.endswith("attention.qkv.weight"):
            assert torch.equal(p, ref_params[name]), name
    for layer in range(2):
        w, w_ref = qkv(model, layer), ref_params[f"model.layers.{layer}.attention.qkv.weight"]
        assert torch.equal(w[2 * H :], w_ref[2 * H :])  # V rows
        for head in range(N_HEADS):
            rows = [slice(head * D, (head + 1) * D), slice(H + head * D, H + (head + 1) * D)]
            for r in rows:
                assert torch.equal(w[r], w_ref[r]) != bool(clipped[layer, head])


@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
def test_alpha_splits_the_factor_between_q_and_k_rows(alpha):
    model, mb = tiny_model(), batch(3)
    tau = 3.0
    pre = row_maxima(model, mb).amax(dim=1)  # (L, nH)
    old = qkv(model, 0)
    run_step(make_clip(model, threshold=tau, alpha=alpha), model, [mb], step=1)
    new = qkv(model, 0)
    eta = tau / pre[0, 1].double()
    assert eta < 1
    q_rows, k_rows = slice(D, 2 * D), slice(H + D, H + 2 * D)
    torch.testing.assert_close(new[q_rows].double(), old[q_rows].double() * eta**alpha, rtol=1e-6, atol=0)
    torch.testing.assert_close(new[k_rows].double(), old[k_rows].double() * eta ** (1 - alpha), rtol=1e-6, atol=0)
    if alpha == 0.0:
        assert torch.equal(new[q_rows], old[q_rows])
    if alpha == 1.0:
        assert torch.equal(new[k_rows], old[k_rows])
    assert (row_maxima(model, mb).amax(dim=1) <= tau * (1 + 1e-3)).all()


def test_mean_statistic_caps_the_mean_of_row_maxima_not_the_max():
    model, mb = tiny_model(), batch(4, rows=4)
    unclipped = tiny_model()
    tau = 3.0
    metrics = run_step(make_clip(model, threshold=tau, statistic="mean"), model, [mb], step=1)
    pre, post = layerwise_pre_clip(model, unclipped, [mb]), row_maxima(model, mb)  # (L, B, nH)
    mean_pre, mean_post = pre.mean(dim=1), post.mean(dim=1)
    clipped = mean_pre > tau
    assert clipped.any() and (~clipped).any()
    assert metrics["train/qk_clip_heads_clipped"] == float(clipped.sum())
    torch.testing.assert_close(mean_post[clipped], torch.full_like(mean_post[clipped], tau), rtol=1e-4, atol=0)
    assert (post.amax(dim=1)[clipped] > tau).any()  # the fork's weakness: single rows stay above tau
    post_max = (pre.amax(dim=1) * torch.where(clipped, tau / mean_pre, 1.0)).max()
    assert metrics["train/max_attention_logit_post_clip"] == pytest.approx(post_max.item(), rel=1e-5)
    w, w0 = qkv(model, 0), qkv(unclipped, 0)
    assert torch.equal(w[:D], w0[:D]) and not torch.equal(w[D : 2 * D], w0[D : 2 * D])  # head 0 < tau < head 1


def test_schedule_interval_and_warmup():
    assert [s for s in range(13) if is_clip_step(s, interval=3, warmup_steps=5)] == [5, 8, 11]
    assert [s for s in range(4) if is_clip_step(s, interval=1, warmup_steps=0)] == [0, 1, 2, 3]
    model, mb = tiny_model(), batch(5)
    clip = make_clip(model, interval=3, warmup_steps=5)
    w0 = qkv(model, 0)
    assert [s for s in range(13) if clip.observes(s, logging=False)] == [5, 8, 11]
    assert clip.begin_step(4, logging=True) == {"output_qk_logits": True}  # logging only: the forward measures
    assert clip.begin_step(5, logging=True) == {}  # clip step: measured after the update, by the replay
    # A logging step that is not a clip step measures (forward statistic) and never scales.
    metrics = run_step(clip, model, [mb], step=4, logging=True)
    assert set(metrics) == {"train/max_attention_logit", "train/max_attention_logit/layer_0",
                            "train/max_attention_logit/layer_1"}
    assert metrics["train/max_attention_logit"] == pytest.approx(row_maxima(model, mb).max().item(), rel=1e-5)
    assert metrics["train/max_attention_logit"] > 3.0 and torch.equal(qkv(model, 0), w0)
    run_step(clip, model, [mb], step=5)
    assert not torch.equal(qkv(model, 0), w0)


def test_no_observation_changes_nothing_and_keeps_nothing():
    model, mb = tiny_model(), batch(6)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    clip = make_clip(model, interval=2)
    assert clip.begin_step(1, logging=False) == {}
    clip.record(mb, model(**mb))  # a step that does not observe: recording is a no-op
    assert clip._batches == [] and clip.after_step(1) == {}
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    clip.begin_step(3, logging=True)
    with pytest.raises(ValueError, match="output_qk_logits|qk_logits"):
        clip.record(mb, model(**mb))  # a logging step whose forward was not asked for the logits
    clip.begin_step(2, logging=False)
    with pytest.raises(ValueError):
        clip.after_step(3)


def test_packed_rows_only_count_pairs_inside_a_document():
    model = tiny_model()
    t = 12
    ids = torch.randint(1, 64, (2, t), generator=torch.Generator().manual_seed(7))
    docs = torch.tensor([[0] * 5 + [1] * 7, [0] * 8 + [1] * 2 + [-1] * 2])
    positions = torch.stack([torch.cat([torch.arange(5), torch.arange(7)]),
                             torch.cat([torch.arange(8), torch.arange(2), torch.zeros(2, dtype=torch.long)])])
    packed = {"input_ids": ids, "attention_mask": (docs >= 0).long(), "document_ids": docs, "position_ids": positions}
    clip = make_clip(model, interval=10**6)
    metrics = run_step(clip, model, [packed], step=1, logging=True)
    per_doc = row_maxima(model, packed).amax(dim=(1, 2))  # (L,)
    across = row_maxima(model, packed, all_pairs=True).amax(dim=(1, 2))
    for i in range(2):
        assert metrics[f"train/max_attention_logit/layer_{i}"] == pytest.approx(per_doc[i].item(), rel=1e-5)
    assert (across - per_doc).abs().max() > 1e-2  # cross-document pairs would have changed the answer


def test_rejects_bad_settings():
    model = tiny_model()
    for bad in ({"threshold": 0.0}, {"alpha": 1.5}, {"interval": 0}, {"warmup_steps": -1}, {"statistic": "p99"}):
        with pytest.raises(ValueError):
            make_clip(model, **bad)


def test_training_step_with_backward_and_a_real_optimizer():
    """The trainer's path: train-mode forward + backward per micro-batch inside observing, optimizer.step(), clip."""
    model, mbs = tiny_model().train(), [batch(8), batch(9)]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    clip = make_clip(model, threshold=2.5)
    forward_kwargs = clip.begin_step(3, logging=True)
    for mb in mbs:
        labels = mb["input_ids"].masked_fill(mb["attention_mask"] == 0, -100)
        out = model(**mb, labels=labels, **forward_kwargs)
        out.loss.backward()
        clip.record(mb, out)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    metrics = clip.after_step(3)
    assert metrics["train/qk_clip_heads_clipped"] >= 2
    assert model.training and all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())  # grads untouched
    model.eval()
    post = torch.cat([row_maxima(model, mb) for mb in mbs], dim=1).amax(dim=1)
    assert (post <= 2.5 * (1 + 1e-3)).all()
    assert post.max().item() == pytest.approx(2.5, rel=1e-4)


def test_activation_checkpointing_recomputation_is_not_observed_twice():
    model, mb = tiny_model().train(), batch(10)
    model.enable_activation_checkpointing({"use_reentrant": False})
    clip = make_clip(model, interval=100)
    forward_kwargs = clip.begin_step(1, logging=True)
    out = model(**mb, labels=mb["input_ids"], **forward_kwargs)
    out.loss.backward()  # backward re-runs every layer's attention
    clip.record(mb, out)
    rows = clip._row_sum[:, -1].tolist()
    assert rows == [3.0, 3.0]  # each of the 3 rows counted once per layer, not twice
    assert clip.after_step(1)["train/max_attention_logit"] == pytest.approx(row_maxima(model.eval(), mb).max().item(),
                                                                          rel=1e-5)
