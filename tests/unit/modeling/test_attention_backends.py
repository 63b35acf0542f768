"""Attention backends beyond the packed-row equivalence in test_modeling_neobert.py: the varlen backends' unpad-once
token stream, the QK-measuring fallback to the padded grid, 'auto''s choice, and the CUDA kernels (skipped without
CUDA: torch's varlen kernel, flash-attn and flex_attention's backward have no CPU implementation)."""

import logging
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from test_modeling_neobert import packed_batch  # tests/unit/modeling/test_modeling_neobert.py
from torch.utils._python_dispatch import TorchDispatchMode

from neobert_pt import NeoBERTConfig, NeoBERTForMaskedLM, NeoBERTModel
from neobert_pt.modeling.configuration_neobert import choose_attn_implementation
from neobert_pt.modeling.modeling_neobert import (
    build_layout,
    flash_attn_available,
    flex_attention_available,
    repad,
    torch_varlen_available,
    unpad,
    varlen_reference,
    varlen_sizes,
)

# ops that read device memory back to the host (scalar reads, value-dependent output sizes)
SYNCING_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten._unique2",
               "aten.unique_consecutive", "aten.unique_dim", "aten.repeat_interleave"}


class OpCounter(TorchDispatchMode):
    """Counts every aten op run inside it, by overload packet name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket._qualified_op_name.replace("::", ".")] += 1
        return func(*args, **(kwargs or {}))


def test_unpad_and_repad_are_inverse_on_real_tokens():
    doc = torch.tensor([[0, 0, 1, -1], [0, 0, 0, 0]])
    layout = build_layout(doc, "varlen")
    x = torch.arange(8.0).view(2, 4, 1).expand(2, 4, 3)
    stream = unpad(x, layout)
    assert stream.shape == (1, 7, 3) and stream[0, :, 0].tolist() == [0, 1, 2, 4, 5, 6, 7]
    back = repad(stream, layout)
    assert back.shape == (2, 4, 3) and torch.equal(back[doc >= 0], x[doc >= 0]) and back[0, 3].abs().sum() == 0


def test_varlen_reference_is_attention_inside_each_segment():
    q, k, v = (torch.randn(9, 2, 4) for _ in range(3))
    cu = torch.tensor([0, 4, 5, 9], dtype=torch.int32)
    out = varlen_reference(q, k, v, cu, scale=0.3)
    for lo, hi in ((0, 4), (4, 5), (5, 9)):
        seg = [x[lo:hi].transpose(0, 1) for x in (q, k, v)]
        torch.testing.assert_close(out[lo:hi], F.scaled_dot_product_attention(*seg, scale=0.3).transpose(0, 1))


@pytest.mark.parametrize("observed", [False, True])
def test_varlen_layers_run_on_the_unpadded_stream(make_config, observed):
    """Unpadded once: every layer sees (1, real tokens, H); when QK logits are measured (``output_qk_logits``,
    QK-clip) the layers keep the (B, T) grid so the statistic stays per row. Both give the sdpa outputs on real
    tokens, and the measured logits equal sdpa's."""
    model = NeoBERTModel(make_config(attn_implementation="varlen")).eval()
    ref = NeoBERTModel(make_config(attn_implementation="sdpa")).eval()
    ref.load_state_dict(model.state_dict())
    _, batch = packed_batch(97)
    real = batch["document_ids"] >= 0
    shapes = []
    hooks = [layer.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
             for layer in model.layers]
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True, output_qk_logits=observed)
        expected = ref(**batch, output_hidden_states=True, output_qk_logits=observed)
    for h in hooks:
        h.remove()
    grid = (1, int(real.sum()), 32) if not observed else (2, 14, 32)
    assert shapes == [grid] * model.config.num_hidden_layers
    if observed:
        assert [q.shape for q in out.qk_logits] == [(2, 4)] * 2
        for mine, theirs in zip(out.qk_logits, expected.qk_logits, strict=True):
            torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
        hidden, rotary, layout = model.layer_inputs(**batch)  # the stream: measuring on it is refused, one line
        with pytest.raises(ValueError, match="output_qk_logits=True"):
            model.layers[0](hidden, rotary, layout, measure_qk_logits=True)
        hidden, rotary, layout = model.layer_inputs(**batch, output_qk_logits=True)
        assert hidden.shape == (2, 14, 32)
        assert torch.equal(model.layers[0](hidden, rotary, layout, measure_qk_logits=True)[2], out.qk_logits[0])
    torch.testing.assert_close(out.last_hidden_state[real], expected.last_hidden_state[real], atol=1e-5, rtol=1e-5)
    assert len(out.hidden_states) == 3 and all(h.shape == (2, 14, 32) for h in out.hidden_states)
    for mine, theirs in zip(out.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(mine[real], theirs[real], atol=1e-5, rtol=1e-5)
    if not observed:  # padding positions are never computed on the stream: they come back as zeros
        assert out.last_hidden_state[~real].abs().sum() == 0


def test_varlen_gathers_once_per_forward_not_per_layer(make_config):
    """The number of gathers/scatters on the varlen path does not grow with depth (it did: 3 gathers + 1 scatter
    per layer); the QK-measuring forward still gathers per layer, which is what this test can tell apart."""
    _, batch = packed_batch(97)
    sizes = varlen_sizes(batch["document_ids"])

    def gathers(layers: int, observed: bool) -> int:
        model = NeoBERTModel(make_config(attn_implementation="varlen", num_hidden_layers=layers)).eval()
        with torch.no_grad(), OpCounter() as counter:
            model(**batch, varlen_sizes=sizes, output_qk_logits=observed)
        return counter.ops["aten.index_select"] + counter.ops["aten.index_copy"]

    assert gathers(2, observed=False) == gathers(5, observed=False)
    assert gathers(5, observed=True) - gathers(2, observed=True) == 3 * 4  # q, k, v gathered and out scattered


def test_varlen_step_has_no_host_sync_given_host_sizes(make_config):
    """With host-computed ``varlen_sizes`` and masked positions (the trainer passes both) a varlen forward+backward
    reads nothing back from the device; without the sizes the metadata costs syncs (so the counter sees them)."""
    model = NeoBERTForMaskedLM(make_config(attn_implementation="varlen"))
    _, batch = packed_batch(97)
    labels = batch["input_ids"].masked_fill(batch["document_ids"] < 0, -100)
    positions = labels.flatten().ne(-100).nonzero().squeeze(-1)
    host = dict(batch, labels=labels, masked_positions=positions, varlen_sizes=varlen_sizes(batch["document_ids"]))
    with OpCounter() as counter:
        model(**host, num_items_in_batch=len(positions)).loss.backward()
    assert counter.ops["aten.index_select"] > 0  # the counter sees the model's ops
    assert not SYNCING_OPS & set(counter.ops), counter.ops
    with OpCounter() as counter:
        build_layout(batch["document_ids"], "varlen")
    assert SYNCING_OPS & set(counter.ops)


@pytest.mark.slow
def test_compiled_varlen_blocks_recompile_once_then_never(make_config):
    """The stream's length is the batch's real-token count, so compiled blocks see a new shape when padding changes:
    one recompile marks that dimension dynamic, after which a third length (and a new longest document) compiles
    nothing (``fail_on_recompile`` would raise). ~1 min of inductor on CPU."""
    model = NeoBERTForMaskedLM(make_config(attn_implementation="varlen"))
    for layer in model.model.layers:
        layer.compile()

    def batch(pad: int) -> dict:
        doc = torch.zeros(2, 16, dtype=torch.long)
        doc[0, 8:] = 1
        doc[1, 16 - pad :] = -1
        ids = torch.randint(1, 97, (2, 16))
        return dict(input_ids=ids, document_ids=doc, attention_mask=(doc >= 0).long(),
                    labels=ids.masked_fill(doc < 0, -100), varlen_sizes=varlen_sizes(doc))

    model(**batch(2)).loss.backward()
    model(**batch(3)).loss.backward()
    with torch.compiler.set_stance("fail_on_recompile"):
        eager = NeoBERTForMaskedLM(make_config(attn_implementation="sdpa"))
        eager.load_state_dict(model.state_dict())
        third = batch(5)
        loss = model(**third).loss
        torch.testing.assert_close(loss, eager(**{k: v for k, v in third.items() if k != "varlen_sizes"}).loss,
                                   rtol=1e-4, atol=1e-5)


def test_auto_choice_order():
    choose = choose_attn_implementation
    cpu = choose(cuda=False, flash_attn=True, torch_varlen=True, flex=True)
    assert cpu[0] == "sdpa" and "no CUDA" in cpu[1]
    assert choose(cuda=True, flash_attn=True, torch_varlen=True, flex=True)[0] == "flash_attention_2"
    assert choose(cuda=True, flash_attn=False, torch_varlen=True, flex=True)[0] == "varlen"
    old = choose(cuda=True, flash_attn=False, torch_varlen=False, flex=True, torch_version="2.11.0")
    assert old[0] == "flex_attention" and "torch 2.11.0 has no varlen_attn" in old[1]
    assert choose(cuda=True, flash_attn=False, torch_varlen=False, flex=False)[0] == "sdpa"
    fp32 = choose(cuda=True, flash_attn=True, torch_varlen=True, flex=True, half_precision=False)
    assert fp32[0] == "flex_attention" and "bf16/fp16 only" in fp32[1]  # the flash kernels cannot run fp32


def test_auto_logs_one_line(caplog):
    with caplog.at_level(logging.INFO, logger="neobert_pt.modeling.configuration_neobert"):
        config = NeoBERTConfig(attn_implementation="auto")
    records = [r for r in caplog.records if "attn_implementation 'auto'" in r.getMessage()]
    assert len(records) == 1 and f"'{config._attn_implementation}'" in records[0].getMessage()
    if not torch.cuda.is_available():
        assert config._attn_implementation == "sdpa"


def test_missing_varlen_kernel_is_one_clear_error(make_config):
    if torch_varlen_available():
        pytest.skip(f"torch {torch.__version__} has varlen_attn; the missing-kernel error cannot occur here")
    model = NeoBERTModel(make_config(attn_implementation="varlen"))
    _, batch = packed_batch(97)
    with pytest.raises(ImportError, match="attn_implementation='varlen' needs torch.nn.attention.varlen"):
        model(**batch)


# ----------------------------------------------------------------------------------------------------------------
# CUDA: the real kernels (skipped without CUDA)
# ----------------------------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _cuda_backends() -> list:
    return [
        "sdpa",
        pytest.param("flex_attention", marks=pytest.mark.skipif(not flex_attention_available(), reason="no flex")),
        pytest.param("varlen", marks=pytest.mark.skipif(not torch_varlen_available(), reason="no varlen_attn")),
        pytest.param("flash_attention_2", marks=pytest.mark.skipif(not flash_attn_available(), reason="no flash-attn")),
    ]


@cuda
@pytest.mark.parametrize("impl", _cuda_backends())
def test_cuda_packed_row_fwd_bwd(make_config, impl):
    """On CUDA in bf16: a packed batch's outputs equal each document run alone, and its parameter gradients equal the
    sum of the documents' own (bf16 tolerances: the kernels accumulate in fp32 but round q/k/v and outputs)."""
    device = torch.device("cuda")
    model = NeoBERTModel(make_config(attn_implementation=impl, hidden_size=128, num_attention_heads=2)).to(device)
    docs, batch = packed_batch(97)
    batch = {k: v.to(device) for k, v in batch.items()}
    sizes = varlen_sizes(batch["document_ids"].cpu())
    probe = torch.randn(model.config.hidden_size, device=device)
    real = batch["document_ids"] >= 0

    def run(**inputs):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hidden = model(**inputs).last_hidden_state
        return hidden.float()

    packed = run(**batch, varlen_sizes=sizes)
    (packed[real] @ probe).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    # (row, first column) of each document in packed_batch: three in row 0, one filling row 1
    where = [(0, 0), (0, 5), (0, 8), (1, 0)]
    alone_grads: dict = {}
    for d, (row, lo) in zip(docs, where, strict=True):
        hidden = run(input_ids=d[None].to(device))
        (hidden[0] @ probe).sum().backward()
        for n, p in model.named_parameters():
            alone_grads[n] = alone_grads.get(n, 0) + p.grad
        torch.testing.assert_close(packed[row, lo : lo + len(d)].detach(), hidden[0].detach(), atol=3e-2, rtol=3e-2)
    for n in packed_grads:
        torch.testing.assert_close(packed_grads[n], alone_grads[n], atol=5e-2, rtol=5e-2, msg=n)


@cuda
@pytest.mark.skipif(not torch_varlen_available(), reason="torch has no varlen_attn")
def test_cuda_torch_varlen_kernel_matches_reference():
    """torch's varlen_attn through the backend equals the plain-torch reference, forward and backward (bf16)."""
    from neobert_pt.modeling.modeling_neobert import NeoBERTAttentionLayout, _torch_varlen_kernel

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(40, 2, 64, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    cu = torch.tensor([0, 7, 8, 30, 40], dtype=torch.int32, device="cuda")
    layout = NeoBERTAttentionLayout(cu_seqlens=cu, max_seqlen=22)
    out = _torch_varlen_kernel(q, k, v, layout, scale=0.125, dropout=0.0)
    ref = varlen_reference(*(x.float() for x in (q, k, v)), cu, scale=0.125)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for mine, theirs in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(mine.float(), theirs.float(), atol=5e-2, rtol=5e-2)
