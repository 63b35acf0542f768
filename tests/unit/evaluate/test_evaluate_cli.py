"""CLI: probe + pppl on a run dir and on a training checkpoint, --help, and one-line errors (offline Hub, bad paths)."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from neobert_pt.config import load_config, save_config
from neobert_pt.evaluate.cli import main
from neobert_pt.evaluate.probe import order_examples


def test_help_lists_every_suite(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    for word in ("probe", "pppl", "glue", "ner", "embeddings", "--glue-data", "--ner-data", "--sts-data"):
        assert word in out


def test_probe_examples_split_by_document():
    docs = [list(range(100 * d, 100 * d + 70)) for d in range(10)]
    rows, labels, test = order_examples(docs, window=16, max_windows=None, seed=0)
    assert len(rows) == 10 * 4 * 2 and labels.tolist() == [1, 0] * 40
    assert sorted(rows[1]) == sorted(rows[0]) and rows[1] != rows[0]  # same bag of tokens, shuffled
    test_docs = {rows[i][0] // 100 for i in range(len(rows)) if test[i]}
    train_docs = {rows[i][0] // 100 for i in range(len(rows)) if not test[i]}
    assert len(test_docs) == 2 and not test_docs & train_docs


def test_probe_and_pppl_on_a_training_checkpoint(tmp_path, capsys):
    """checkpoints/step_N (raw weights + config.yaml with the embedded tokenizer) is materialised and evaluated."""
    run = load_config(None)
    run = replace(run, model=replace(run.model, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64),
                  dataset=replace(run.dataset, name="embedded", max_seq_length=32, eval_fraction=0.01),
                  tokenizer=replace(run.tokenizer, name="embedded"))
    from neobert_pt.modeling import NeoBERTConfig, NeoBERTForMaskedLM

    torch.manual_seed(0)
    model = NeoBERTForMaskedLM(NeoBERTConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64,
                                             max_position_embeddings=64, pad_token_id=0))
    ckpt = tmp_path / "run" / "checkpoints" / "step_7"
    ckpt.mkdir(parents=True)
    save_file({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, ckpt / "model.safetensors")
    save_config(run, ckpt / "config.yaml")
    save_config(run, tmp_path / "run" / "config.yaml")
    code = main([str(ckpt), "--suite", "pppl", "probe", "--pppl-max-tokens", "60", "--probe-max-windows", "40",
                 "--probe-window", "8", "--no-progress", "--cpu"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "run" / "eval" / "step_7" / "eval_results.json").read_text())
    assert results["step"] == 7 and results["model"] == "run/checkpoints/step_7"  # no absolute local path
    pppl = results["suites"]["pppl"]
    assert pppl["metrics"]["tokens"] == 60 and pppl["settings"]["max_length"] == 32
    assert 1 < pppl["metrics"]["pppl"] < 1e6
    probe = results["suites"]["probe"]["metrics"]
    assert {"accuracy", "random_init_accuracy", "margin"} <= set(probe)
    assert list(ckpt.iterdir()) and not (ckpt / "eval_results.json").exists()  # the sealed checkpoint is untouched


def test_offline_hub_dataset_is_one_line(model_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main([str(model_dir), "--suite", "glue", "--glue-tasks", "rte", "--no-progress", "--cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "'nyu-mll/glue' (config 'rte') cannot be reached" in err and "--glue-data DIR" in err


def test_unknown_model_and_offline_hub_model_are_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "nothing_here")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not found" in err
    assert main(["someone/some-model", "--cpu"]) == 2  # the suite runs with HF_HUB_OFFLINE=1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Hub model 'someone/some-model' cannot be reached" in err
