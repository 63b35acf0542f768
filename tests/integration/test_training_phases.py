"""Phases through the trainer on a tiny model and the embedded corpus: per-step values, RoPE base from the boundary
on, bit-exact resume inside a phase and at a boundary, exact token-mean gradients under batch-size warmup, and the
shipped recipes (tiny versions train; the 100M ones resolve with --print-config)."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest
import torch
from training_runs import run  # tests/integration/training_runs.py

from neobert_pt.config import load_config, parse_args
from neobert_pt.config.yamlio import parse_yaml
from neobert_pt.modeling.modeling_neobert import rope_inv_freq
from neobert_pt.train import Trainer
from neobert_pt.train.checkpoint import Checkpointer
from neobert_pt.train.summary import read_metrics

ROOT = Path(__file__).resolve().parents[2]
PHASES = (
    "[{name: warm, steps: 3, mlm_probability: 0.3, gradient_accumulation_steps: 3, batch_warmup_steps: 3},"
    " {name: long, steps: 3, max_seq_length: 128, rope_theta: 80000, mlm_schedule: linear, mlm_probability: 0.3,"
    "  mlm_probability_end: 0.15},"
    " {name: low, steps: 2, max_seq_length: 128, rope_theta: 80000, mlm_probability: 0.15}]"
)
TINY = [
    "--model.hidden_size", "32", "--model.num_hidden_layers", "1", "--model.num_attention_heads", "2",
    "--model.intermediate_size", "64", "--model.max_position_embeddings", "128", "--dataset.max_seq_length", "64",
    "--dataset.max_documents", "60", "--trainer.per_device_train_batch_size", "4",
    "--trainer.gradient_accumulation_steps", "2", "--trainer.max_steps", "auto", "--trainer.logging_steps", "1",
    "--trainer.eval_steps", "100", "--trainer.eval_max_batches", "1", "--scheduler.warmup_steps", "2",
    "--trainer.disable_tqdm", "true", "--seed", "5", "--phases", PHASES,
]
# step -> (seq_len, masking rate, tokens per step, phase); warmup accumulation 1, 1, 2 then 3, later phases 2
EXPECTED = {1: (64, 0.3, 256, 0), 2: (64, 0.3, 256, 0), 3: (64, 0.3, 512, 0), 4: (128, 0.3, 1024, 1),
            5: (128, 0.225, 1024, 1), 6: (128, 0.15, 1024, 1), 7: (128, 0.15, 1024, 2), 8: (128, 0.15, 1024, 2)}


def tiny(out: Path, *extra: str):
    return load_config(None, [*TINY, "--trainer.output_dir", str(out), *extra])


def train_records(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r}


def trajectory(out: Path) -> dict[int, tuple]:
    return {s: (r["train/loss"], r["train/grad_norm"], r["train/lr"]) for s, r in train_records(out).items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 8-step, 3-phase run; records the RoPE frequency every step ran with."""
    torch.set_num_threads(1)  # as every test (conftest); module fixtures run before the autouse one
    out = tmp_path_factory.mktemp("phases_ref")
    seen: dict[int, float] = {}
    original = Trainer.train_step

    def recording(self, should_log):
        seen[self.state.step + 1] = self.unwrapped.model.rotary_emb.inv_freq[1].item()
        return original(self, should_log)

    mp = pytest.MonkeyPatch()
    mp.setattr(Trainer, "train_step", recording)
    try:
        trainer, summary = run(tiny(out))
    finally:
        mp.undo()
    params = {k: v.detach().clone() for k, v in trainer.unwrapped.state_dict().items()}
    return out, summary, params, trainer, seen


def test_every_step_logs_its_phase_settings(reference):
    out, summary, _, trainer, _ = reference
    records = train_records(out)
    assert summary["steps"] == 8 and load_config(str(out / "config.yaml"), []).trainer.max_steps == 8
    for step, (seq, rate, tokens, phase) in EXPECTED.items():
        r = records[step]
        assert (r["train/seq_len"], r["train/batch_tokens"], r["train/phase"]) == (seq, tokens, phase), step
        assert r["train/mlm_probability"] == pytest.approx(rate), step
    # a checkpoint at each phase boundary (3, 6) and at the end, although save_steps is 500
    assert [p.name for p in Checkpointer(None, out, save_steps=None, save_total_limit=None, max_steps=8).complete()] \
        == ["step_3", "step_6", "step_8"]
    assert trainer.data.tokens_per_row == 128 and trainer.data.train.batch_size == 4
    log = (out / "logs" / "rank_0.log").read_text()
    assert "phase long: data re-built with 128-token rows" in log
    assert "phase low: data re-built" not in log  # same rows and batch: the loader carries on, no re-read


def test_rope_theta_applies_from_the_boundary_on(reference):
    _, _, _, trainer, seen = reference
    cfg = trainer.unwrapped.config
    base, extended = (rope_inv_freq(cfg.__class__(**{**cfg.to_dict(), "rope_theta": t}))[1].item()
                      for t in (10000.0, 80000.0))
    assert base != extended
    assert [seen[s] for s in range(1, 9)] == [base] * 3 + [extended] * 5
    assert cfg.rope_theta == 80000.0  # and the final model's config says so


@pytest.mark.parametrize("save_steps, crash_after, resumed_from", [(4, 5, 4), (500, 4, 3)],
                         ids=["inside_a_phase", "at_a_boundary"])
def test_resume_is_bit_exact(reference, tmp_path, monkeypatch, save_steps, crash_after, resumed_from):
    ref_out, _, ref_params, ref_trainer, _ = reference
    original = Trainer.train_step

    def crash(self, should_log):
        if self.state.step == crash_after:
            raise KeyboardInterrupt("simulated kill")
        return original(self, should_log)

    monkeypatch.setattr(Trainer, "train_step", crash)
    with pytest.raises(KeyboardInterrupt):
        run(tiny(tmp_path, "--trainer.save_steps", str(save_steps)))
    monkeypatch.setattr(Trainer, "train_step", original)

    trainer, summary = run(tiny(tmp_path, "--trainer.save_steps", str(save_steps),
                                "--trainer.resume_from_checkpoint", "latest"))
    assert trainer.resumed_from_step == resumed_from and summary["steps"] == 8
    assert trajectory(tmp_path) == trajectory(ref_out)  # loss, grad norm, LR of every step, bit for bit
    assert trainer.data.train.state_dict() == ref_trainer.data.train.state_dict()
    for k, v in trainer.unwrapped.state_dict().items():
        assert torch.equal(v, ref_params[k]), k


def test_batch_warmup_step_is_the_exact_token_mean_gradient(tmp_path):
    """A 3-micro-batch step's gradient equals the gradient of the mean CE over all its masked tokens at once."""
    trainer = Trainer(tiny(tmp_path, "--trainer.max_grad_norm", "null"))
    try:
        trainer.state.step = 2  # the warmup step with 2 micro-batches; take 3 to make the point stronger
        trainer._sync_phase()
        trainer.accumulation = 3
        position = trainer.data.train.state_dict()
        window = [next(trainer.train_iter) for _ in range(3)]
        trainer.data.train.load_state_dict(position)
        batch = {k: torch.cat([b[k] for b in window]) for k in window[0]}
        model = trainer.unwrapped
        out = model(**batch)
        labels = batch["labels"][batch["labels"] != -100]
        assert out.logits.shape[0] == labels.numel()  # masked positions only
        torch.nn.functional.cross_entropy(out.logits.float(), labels).backward()
        expected = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        counts = [int((b["labels"] != -100).sum()) for b in window]
        assert len(set(counts)) > 1  # unequal micro-batches: a mean of means would be wrong

        captured = {}
        trainer.optimizer.step = lambda: captured.update({n: p.grad.clone() for n, p in model.named_parameters()})
        trainer.train_step(should_log=False)
        for name, grad in expected.items():
            torch.testing.assert_close(captured[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    finally:
        trainer.close()


TINY_RECIPES = sorted(glob.glob(str(ROOT / "configs" / "pretraining" / "phases" / "tiny_*.yaml")))


@pytest.mark.parametrize("path", TINY_RECIPES, ids=lambda p: Path(p).stem)
def test_tiny_recipes_train_through_the_trainer(path, tmp_path):
    cfg = load_config(path, ["--trainer.output_dir", str(tmp_path), "--trainer.disable_tqdm", "true"])
    _, summary = run(cfg)
    records = train_records(tmp_path)
    assert summary["steps"] == cfg.trainer.max_steps == len(records)
    phases_seen = [records[s]["train/phase"] for s in sorted(records)]
    assert phases_seen == sorted(phases_seen) and set(phases_seen) == set(range(len(cfg.phases)))
    assert all(r["train/loss"] == r["train/loss"] for r in records.values())  # finite, not NaN


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "configs" / "pretraining" / "phases" / "*.yaml"))),
                         ids=lambda p: Path(p).stem)
def test_recipes_resolve_with_print_config(path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as info:
        parse_args([path, "--print-config"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    resolved = parse_yaml(out)
    assert resolved["phases"] and isinstance(resolved["trainer"]["max_steps"], int)
    assert out.count("\n# phase ") == len(resolved["phases"])
    assert os.path.basename(path).startswith(("tiny_", "neobert100m_"))


def test_scaling_rule_and_auto_budget_are_written_to_config_yaml(tmp_path):
    """`model.scaling_rule` + `trainer.max_steps: auto` + `optimizer.lr: auto` through the trainer: config.yaml
    holds the numbers the run used, and reloading it reproduces them."""
    import math

    from neobert_pt.optim.lr_rule import count_non_embedding_params, suggest_peak_lr

    cfg = load_config(None, [
        "--model.scaling_rule", "neobert", "--model.heads", "2", "--dataset.max_seq_length", "32",
        "--dataset.max_documents", "40", "--trainer.per_device_train_batch_size", "4",
        "--trainer.max_steps", "auto", "--trainer.tokens_per_param", "0.002", "--optimizer.lr", "auto",
        "--trainer.eval_steps", "null", "--trainer.eval_max_batches", "1", "--trainer.disable_tqdm", "true",
        "--trainer.save_final_model", "false", "--trainer.output_dir", str(tmp_path)])
    trainer, summary = run(cfg)
    params = count_non_embedding_params(trainer.unwrapped)
    assert (trainer.unwrapped.config.hidden_size, trainer.unwrapped.config.num_hidden_layers) == (128, 2)
    steps = math.ceil(math.ceil(0.002 * params) / (4 * 32))
    saved = load_config(str(tmp_path / "config.yaml"), [])
    assert summary["steps"] == saved.trainer.max_steps == steps
    assert saved.optimizer.lr == suggest_peak_lr("adamw", params, tokens_per_step=4 * 32)
    assert (saved.model.hidden_size, saved.model.scaling_rule, saved.model.heads) == (128, "neobert", 2)


def test_resume_without_the_phase_of_the_checkpoint_is_one_clear_error(reference, tmp_path):
    import shutil

    from neobert_pt.config import ConfigError

    ref_out = reference[0]
    shutil.copytree(ref_out / "checkpoints", tmp_path / "checkpoints", symlinks=True)
    cfg = tiny(tmp_path, "--phases", "[]", "--trainer.max_steps", "10", "--trainer.resume_from_checkpoint", "latest")
    with pytest.raises(ConfigError, match=r"step_8 was written in phase 2 \('low'\) but the config has 0 phase\(s\)"):
        Trainer(cfg)
