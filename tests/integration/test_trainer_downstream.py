"""Downstream suites during pretraining: logged at checkpoints, in the summary, equal to an offline evaluation."""

import pytest

from neobert_pt.config import ConfigError, load_config
from neobert_pt.data import build_tokenizer
from neobert_pt.evaluate.suites import run_pppl
from neobert_pt.modeling import NeoBERTForMaskedLM
from neobert_pt.train import Trainer
from neobert_pt.train.summary import read_metrics

TINY = [
    "--model.hidden_size", "32", "--model.num_hidden_layers", "1", "--model.num_attention_heads", "2",
    "--model.intermediate_size", "64", "--dataset.max_seq_length", "32", "--dataset.max_documents", "30",
    "--trainer.per_device_train_batch_size", "4", "--trainer.max_steps", "4", "--trainer.logging_steps", "2",
    "--trainer.eval_steps", "4", "--trainer.eval_max_batches", "1", "--trainer.save_steps", "2",
    "--scheduler.warmup_steps", "1", "--trainer.disable_tqdm", "true", "--seed", "1",
    "--trainer.downstream_suites", "[pppl, probe]", "--trainer.downstream_pppl_tokens", "48",
    "--trainer.downstream_probe_windows", "40",
]


def test_downstream_suites_logged_at_checkpoints_and_summarised(tmp_path):
    cfg = load_config(None, [*TINY, "--trainer.output_dir", str(tmp_path)])
    trainer = Trainer(cfg)
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "downstream/pppl/pppl" in r]
    assert [r["step"] for r in records] == [2, 4]  # every checkpoint save (save_steps 2, max_steps 4)
    for r in records:
        assert r["downstream/pppl/tokens"] == 48 and 1 < r["downstream/pppl/pppl"] < 1e6
        assert 0 <= r["downstream/probe/accuracy"] <= 1
    assert summary["downstream/pppl/pppl"] == records[-1]["downstream/pppl/pppl"]
    assert summary["downstream/probe/accuracy"] == records[-1]["downstream/probe/accuracy"]

    # the same number from the saved final model, evaluated offline with the same budget
    model = NeoBERTForMaskedLM.from_pretrained(tmp_path / "final").eval()
    offline = run_pppl(model, build_tokenizer(cfg), eval_fraction=cfg.dataset.eval_fraction, max_length=32,
                       max_tokens=48, batch_size=cfg.trainer.per_device_eval_batch_size, progress=False)
    assert offline["metrics"]["pppl"] == pytest.approx(records[-1]["downstream/pppl/pppl"], rel=1e-5)


def test_downstream_suites_are_strict():
    with pytest.raises(ConfigError, match="downstream_suites"):
        load_config(None, ["--trainer.downstream_suites", "[glue]"])
    with pytest.raises(ConfigError, match="downstream_steps"):
        load_config(None, ["--trainer.downstream_steps", "0"])
