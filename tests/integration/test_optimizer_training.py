"""Every registered optimizer pretrains a tiny NeoBERT end to end through the real Trainer (issues 5, 6, 7).

What a unit test of an optimizer cannot show: the registry builder, the param-group policy, the scheduler, the
QK-clip hooks of ``Trainer.train_step`` and checkpoint/resume work together so that the loss falls, nothing goes
non-finite, the metrics carry the documented keys, clipping bounds the logits the next forward pass sees, and a
resumed run continues bit for bit.
"""

import math
from pathlib import Path

import pytest
import torch

from neobert_pt.config import load_config
from neobert_pt.modeling.modeling_neobert import apply_rotary
from neobert_pt.optim.catalog import available_optimizers
from neobert_pt.optim.lr_rule import count_non_embedding_params, suggest_peak_lr
from neobert_pt.train import Trainer
from neobert_pt.train.summary import read_metrics

STEPS = 24
TINY = [
    "--model.hidden_size", "32", "--model.num_hidden_layers", "2", "--model.num_attention_heads", "2",
    "--model.intermediate_size", "64", "--dataset.max_seq_length", "32", "--dataset.max_documents", "30",
    "--trainer.per_device_train_batch_size", "8", "--trainer.gradient_accumulation_steps", "1",
    "--trainer.max_steps", str(STEPS), "--trainer.logging_steps", "1", "--trainer.eval_steps", str(STEPS // 2),
    "--trainer.eval_max_batches", "1", "--trainer.save_steps", "1000", "--trainer.save_final_model", "false",
    "--scheduler.warmup_steps", "2", "--optimizer.lr", "3e-3", "--trainer.disable_tqdm", "true",
    "--wandb.mode", "disabled", "--seed", "0",
]
TRAIN_KEYS = {"step", "train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/steps_per_sec",
              "train/peak_memory_mb", "train/nonfinite_skipped"}
TIMING_KEYS = {"train/tokens_per_sec", "train/steps_per_sec", "train/peak_memory_mb", "train/tflops", "train/mfu"}
TAU = 0.01  # the tiny model's logits are ~0.02-0.07 (init std 0.02, head_dim 16), so this clips on most steps
CLIP_INTERVAL = 2

VARIANTS = {
    "adamw": [],
    "adana": [],
    "dana-mk4": [],
    "dana-star": [],
    "dana-star-mk4": [],
    "adamw-decaying-wd": [],
    "muonclip": ["--optimizer.muon_config.enable_clipping", "false"],
    "dion2": [],
    "dion": ["--optimizer.dion_config.rank_fraction", "0.25"],
    "muonclip+qk": [
        "--optimizer.muon_config.enable_clipping", "true",
        "--optimizer.muon_config.clipping_threshold", str(TAU),
        "--optimizer.muon_config.clipping_interval", str(CLIP_INTERVAL),
    ],
    "dion2+qk": [
        "--optimizer.dion2_config.enable_clipping", "true",
        "--optimizer.dion2_config.clipping_threshold", str(TAU),
        "--optimizer.dion2_config.clipping_interval", str(CLIP_INTERVAL),
    ],
}


def config(out: Path, variant: str, *extra: str):
    name = variant.removesuffix("+qk")
    return load_config(None, [*TINY, "--trainer.output_dir", str(out), "--optimizer.name", name,
                              *VARIANTS[variant], *extra])


class RecordingIterator:
    """Wraps the trainer's batch iterator and keeps the last micro-batch (the one the final step trained on)."""

    def __init__(self, inner):
        self.inner = inner
        self.last: dict[str, torch.Tensor] | None = None

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        self.last = next(self.inner)
        return self.last


def run(cfg) -> tuple[Trainer, dict, RecordingIterator]:
    trainer = Trainer(cfg)
    trainer.train_iter = recorder = RecordingIterator(trainer.train_iter)
    try:
        return trainer, trainer.fit(), recorder
    finally:
        trainer.close()


def train_records(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]


@torch.no_grad()
def max_attention_logit(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Largest scaled q·k over allowed pairs of every head and layer, measured independently of the model's QK-logit
    API and of ``qk_clip.py``: a forward pre-hook recomputes q, k from each attention's ``qkv`` and RoPE (fp64)."""
    docs = batch["document_ids"].masked_fill(batch["attention_mask"] == 0, -1)
    allowed = (docs[:, :, None] == docs[:, None, :]) & (docs[:, :, None] >= 0) & (docs[:, None, :] >= 0)
    seen: list[float] = []

    def dense(attn, args):
        hidden, (cos, sin) = args[0], args[1]
        b, t, _ = hidden.shape
        q, k, _ = attn.qkv(hidden).view(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = apply_rotary(q, cos, sin).double(), apply_rotary(k, cos, sin).double()
        logits = (q @ k.transpose(-1, -2)) * attn.head_dim**-0.5
        seen.append(logits.masked_fill(~allowed[:, None], -math.inf).amax().item())

    model.eval()
    hooks = [layer.attention.register_forward_pre_hook(dense) for layer in model.model.layers]
    try:
        model(**batch)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == len(hooks)
    return max(seen)


def test_every_registry_name_is_covered():
    assert {v.removesuffix("+qk") for v in VARIANTS} == set(available_optimizers())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_optimizer_trains_tiny_neobert(variant, tmp_path):
    trainer, summary, recorder = run(config(tmp_path, variant))
    records = train_records(tmp_path)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(TRAIN_KEYS <= set(r) for r in records)
    assert summary["steps"] == STEPS and summary["nonfinite_skipped"] == 0
    assert all(r["train/nonfinite_skipped"] == 0 for r in records)
    losses = [r["train/loss"] for r in records]
    assert all(isinstance(x, float) and math.isfinite(x) for x in losses), losses
    start, end = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    print(f"{variant}: train loss {start:.3f} -> {end:.3f}")
    assert end < start - 0.3, f"{variant}: loss did not fall clearly: {start:.3f} -> {end:.3f}"
    evals = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "eval/loss" in r]
    assert [r["step"] for r in evals] == [STEPS // 2, STEPS]
    assert evals[1]["eval/loss"] < evals[0]["eval/loss"]  # the same fixed eval batch, later weights

    clipped = variant.endswith("+qk")
    assert (trainer.qk_clip is not None) == clipped
    if not clipped:
        assert not any("train/max_attention_logit" in r for r in records)
        return
    # Observed at every logging step; clip results only on clip steps (every CLIP_INTERVAL-th).
    assert all(math.isfinite(r["train/max_attention_logit"]) for r in records)
    assert all(r["train/max_attention_logit"] == max(r["train/max_attention_logit/layer_0"],
                                                     r["train/max_attention_logit/layer_1"]) for r in records)
    clip_steps = [r for r in records if "train/max_attention_logit_post_clip" in r]
    assert [r["step"] for r in clip_steps] == list(range(CLIP_INTERVAL, STEPS + 1, CLIP_INTERVAL))
    for r in clip_steps:
        assert r["train/max_attention_logit_post_clip"] <= TAU * (1 + 1e-3)
        assert (r["train/qk_clip_heads_clipped"] > 0) == (r["train/max_attention_logit"] > TAU)
    assert clip_steps[-1]["train/qk_clip_heads_clipped"] > 0, "the last step must clip for the check below to bite"
    # The final weights on the final step's batch: every head's max logit is at most tau (layer-by-layer clipping
    # accounts for the earlier layers' clipped outputs), although before the clip it exceeded tau.
    after = max_attention_logit(trainer.unwrapped, recorder.last)
    assert clip_steps[-1]["train/max_attention_logit"] > TAU * (1 + 1e-3)
    assert after <= TAU * (1 + 1e-3), (after, TAU)


RESUME_STEPS, CRASH_AFTER = 8, 4
RESUME = {
    "dana-star-mk4": [],
    "muonclip+qk": ["--optimizer.muon_config.clipping_interval", "3"],  # clip steps 3 and 6: before and after k
    "dion2+qk": ["--optimizer.dion2_config.clipping_interval", "3"],
    "dion": [],
}


@pytest.mark.parametrize("variant", list(RESUME))
def test_resume_continues_bit_exactly(variant, tmp_path, monkeypatch):
    """k steps, a kill, ``resume_from_checkpoint latest`` to N == N uninterrupted steps, bit for bit (fp32, CPU)."""
    extra = ["--trainer.max_steps", str(RESUME_STEPS), "--trainer.eval_steps", "1000", *RESUME[variant]]
    ref_trainer, _, _ = run(config(tmp_path / "ref", variant, *extra))
    ref_params = {k: v.detach().clone() for k, v in ref_trainer.unwrapped.state_dict().items()}

    original = Trainer.train_step

    def killed_after_k(self, should_log):
        if self.state.step == CRASH_AFTER:
            raise KeyboardInterrupt("simulated kill")
        return original(self, should_log)

    out = tmp_path / "resumed"
    ckpt = ["--trainer.save_steps", str(CRASH_AFTER)]
    monkeypatch.setattr(Trainer, "train_step", killed_after_k)
    with pytest.raises(KeyboardInterrupt):
        run(config(out, variant, *extra, *ckpt))
    monkeypatch.setattr(Trainer, "train_step", original)
    trainer, summary, _ = run(config(out, variant, *extra, *ckpt, "--trainer.resume_from_checkpoint", "latest"))
    assert trainer.resumed_from_step == CRASH_AFTER and summary["steps"] == RESUME_STEPS

    def comparable(records):
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]

    ref, resumed = comparable(train_records(tmp_path / "ref")), comparable(train_records(out))
    assert [r["step"] for r in resumed] == list(range(1, RESUME_STEPS + 1))
    assert resumed[CRASH_AFTER:] == ref[CRASH_AFTER:]  # loss, grad norm, lr (and max logit) of every later step
    if variant.endswith("+qk"):
        assert resumed[5]["train/qk_clip_heads_clipped"] > 0  # step 6, after the resume, really clipped
    for k, v in trainer.unwrapped.state_dict().items():
        assert torch.equal(v, ref_params[k]), k


def test_lr_auto_resolves_to_the_logged_power_law_value(tmp_path):
    """The DANA power law in the model's non-embedding parameters: logged, stepped with, and saved in config.yaml."""
    name, steps = "dana-star-mk4", 3
    cfg = config(tmp_path, name, "--optimizer.lr", "auto", "--trainer.max_steps", str(steps))
    trainer, _, _ = run(cfg)
    tokens_per_step = 8 * 32  # rows per step x max_seq_length, as in the startup "batch:" line
    expected = suggest_peak_lr(name, count_non_embedding_params(trainer.unwrapped), kappa=0.85,
                               tokens_per_step=tokens_per_step)
    log = (tmp_path / "logs" / "rank_0.log").read_text()
    assert f"optimizer.lr=auto -> {expected:.3g}" in log
    assert f"optimizer {name}: peak lr {expected:g}" in log
    peak = max(r["train/lr"] for r in train_records(tmp_path))  # warmup 2 reaches factor 1 at step 2
    assert peak == pytest.approx(expected, rel=1e-12)
    assert load_config(str(tmp_path / "config.yaml"), []).optimizer.lr == expected  # the number, not 'auto'
