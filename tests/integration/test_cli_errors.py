"""Every user error through the real CLIs is ONE line on stderr and exit 2, naming the key or file (issue #15).

Most cases call ``pretrain.py``'s ``main(argv)`` in-process (the same code path as the command line); a few run as
real subprocesses to check the exit status and that no traceback reaches the terminal.
"""

import importlib.util
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from neobert_pt import hub
from neobert_pt.robustness import __main__ as robustness_cli

REPO = Path(__file__).resolve().parents[2]
TINY = ["--model.hidden_size", "32", "--model.num_hidden_layers", "1", "--model.num_attention_heads", "2",
        "--model.intermediate_size", "64", "--dataset.max_seq_length", "32", "--dataset.max_documents", "30",
        "--trainer.per_device_train_batch_size", "4", "--trainer.max_steps", "2", "--trainer.logging_steps", "1",
        "--trainer.eval_steps", "null", "--trainer.eval_max_batches", "1", "--trainer.save_steps", "1",
        "--trainer.disable_tqdm", "true", "--wandb.mode", "disabled", "--scheduler.warmup_steps", "0"]


def _load_pretrain():
    spec = importlib.util.spec_from_file_location("pretrain_cli", REPO / "scripts" / "pretraining" / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pretrain = _load_pretrain()


def _exit_code(fn, argv):
    try:
        return fn(argv)
    except SystemExit as e:  # the config parser exits 2 itself
        return e.code


def assert_one_line_error(capsys, fn, argv, *needles):
    code = _exit_code(fn, argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2, (code, err[-2000:])
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "dup_section.yaml").write_text("trainer:\n  max_steps: 5\nseed: 1\ntrainer:\n  save_steps: 2\n")
    (d / "dup_key.yaml").write_text("optimizer:\n  lr: 1.0e-3\n  lr: 2.0e-3\n")
    (d / "latin1.yaml").write_bytes("seed: 1  # caf\xe9\n".encode("latin-1"))
    (d / "syntax.yaml").write_text("trainer: [unclosed\n")
    (d / "list.yaml").write_text("- 1\n- 2\n")
    (d / "empty.jsonl").write_text("")
    (d / "latin1.jsonl").write_bytes('{"text": "caf\xe9 au lait"}\n'.encode("latin-1"))
    (d / "malformed.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (d / "a_file").write_text("not a directory")
    return d


CONFIG_CASES = [
    (["/nonexistent/config.yaml"], ["Config file not found", "/nonexistent/config.yaml"]),
    (["--trainer.max_step", "5"], ["trainer.max_step", "Did you mean trainer.max_steps"]),
    (["--trainer.max_steps", "abc"], ["trainer.max_steps"]),
    (["--optimizer.name", "adamx"], ["optimizer.name", "adamw"]),
    (["--optimizer.lr", "-0.001"], ["optimizer.lr"]),
    (["--optimizer.lr", "0"], ["optimizer.lr", "> 0"]),
    (["--optimizer.lr", ".inf"], ["optimizer.lr", "finite"]),
    (["--optimizer.lr", ".nan"], ["optimizer.lr", "finite"]),
    (["--optimizer.betas", "[0.9]"], ["optimizer.betas", "two numbers"]),
    (["--optimizer.betas", "[0.9, 1.5]"], ["optimizer.betas", "[0, 1)"]),
    (["--optimizer.eps", "0"], ["optimizer.eps"]),
    (["--optimizer.weight_decay", "-0.1"], ["optimizer.weight_decay", ">= 0"]),
    (["--scheduler.warmup_steps", "-1"], ["scheduler.warmup_steps"]),
    (["--optimizer.name", "dion2", "--optimizer.dion2_config.fraction", "0"], ["optimizer.dion2_config.fraction"]),
    (["--trainer.max_steps"], ["--trainer.max_steps needs a value"]),
    (["--seed", "1", "stray"], ["Unexpected argument 'stray'"]),
    (["--trainer.mixed_precision", "fp64"], ["trainer.mixed_precision"]),
]


@pytest.mark.parametrize("argv,needles", CONFIG_CASES, ids=[" ".join(c[0])[:40] for c in CONFIG_CASES])
def test_bad_config_values_and_keys(capsys, argv, needles):
    assert_one_line_error(capsys, pretrain.main, argv, *needles)


@pytest.mark.parametrize("name,needles", [
    ("dup_section.yaml", ["duplicate key 'trainer'", "line 1"]),
    ("dup_key.yaml", ["duplicate key 'lr'"]),
    ("latin1.yaml", ["latin1.yaml", "not UTF-8"]),
    ("syntax.yaml", ["syntax.yaml", "not valid YAML"]),
    ("list.yaml", ["list.yaml", "must be a mapping"]),
])
def test_bad_config_files(capsys, files, name, needles):
    assert_one_line_error(capsys, pretrain.main, [str(files / name), "--print-config"], *needles)


@pytest.mark.parametrize("name,needles", [
    ("empty.jsonl", ["dataset.data_files", "empty.jsonl", "no documents"]),
    ("latin1.jsonl", ["dataset.data_files", "not UTF-8"]),
    ("malformed.jsonl", ["dataset.data_files", "malformed.jsonl"]),
    ("missing.jsonl", ["dataset.data_files", "missing.jsonl"]),
])
def test_bad_data_files(capsys, files, tmp_path, name, needles):
    argv = [*TINY, "--dataset.name", "json", "--dataset.data_files", f"[{files / name}]",
            "--dataset.cache_dir", str(tmp_path / "cache"), "--trainer.output_dir", str(tmp_path / "run")]
    assert_one_line_error(capsys, pretrain.main, argv, *needles)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert pretrain.main([*TINY, "--trainer.output_dir", str(out)]) == 0
    return out


def _run_argv(out, *extra):
    return [*TINY, "--trainer.output_dir", str(out), *extra]


def test_output_dir_that_is_a_file(capsys, files):
    assert_one_line_error(capsys, pretrain.main, _run_argv(files / "a_file"), "a_file", "is a file")


def test_fresh_start_over_another_runs_checkpoints(capsys, finished_run):
    assert_one_line_error(capsys, pretrain.main, _run_argv(finished_run), "already holds checkpoints",
                          "--trainer.resume_from_checkpoint latest")


def test_resume_from_a_path_that_does_not_exist(capsys, tmp_path):
    assert_one_line_error(capsys, pretrain.main,
                          _run_argv(tmp_path, "--trainer.resume_from_checkpoint", str(tmp_path / "nope")),
                          "does not exist")


def _copy(run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(run, out)
    return out


def test_resume_latest_with_no_complete_checkpoint(capsys, finished_run, tmp_path):
    out = _copy(finished_run, tmp_path)
    for marker in (out / "checkpoints").glob("step_*/COMPLETE"):
        marker.unlink()
    assert_one_line_error(capsys, pretrain.main, _run_argv(out, "--trainer.resume_from_checkpoint", "latest"),
                          "no usable checkpoint", "step_2")


def test_resume_with_a_different_model_size_names_the_field(capsys, finished_run, tmp_path):
    out = _copy(finished_run, tmp_path)
    argv = _run_argv(out, "--trainer.resume_from_checkpoint", "latest", "--model.intermediate_size", "96",
                     "--trainer.max_steps", "3")
    assert_one_line_error(capsys, pretrain.main, argv, "model.intermediate_size 64 → 96")


def test_resume_with_another_optimizer_names_both(capsys, finished_run, tmp_path):
    out = _copy(finished_run, tmp_path)
    argv = _run_argv(out, "--trainer.resume_from_checkpoint", "latest", "--optimizer.name", "dion2",
                     "--trainer.max_steps", "3")
    assert_one_line_error(capsys, pretrain.main, argv, "optimizer.name was 'adamw'", "'dion2'")


def test_resume_with_another_batch_size_is_one_line(capsys, finished_run, tmp_path):
    out = _copy(finished_run, tmp_path)
    argv = _run_argv(out, "--trainer.resume_from_checkpoint", "latest", "--trainer.per_device_train_batch_size", "2",
                     "--trainer.max_steps", "3")
    assert_one_line_error(capsys, pretrain.main, argv, "global batch was 4 rows", "is 2 now")


def test_resume_from_a_tampered_checkpoint_is_refused(capsys, finished_run, tmp_path):
    from neobert_pt.train.checkpoint import file_digest

    out = _copy(finished_run, tmp_path)
    step = out / "checkpoints" / "step_2"
    (step / "trainer_state.json").write_bytes(pickle.dumps({"step": 2}))
    meta = json.loads((step / "COMPLETE").read_text())
    meta["files"]["trainer_state.json"] = {"size": (step / "trainer_state.json").stat().st_size,
                                          "blake2b": file_digest(step / "trainer_state.json")}
    (step / "COMPLETE").write_text(json.dumps(meta))
    argv = _run_argv(out, "--trainer.resume_from_checkpoint", str(step), "--trainer.max_steps", "3")
    assert_one_line_error(capsys, pretrain.main, argv, "refusing to load", "trainer_state.json")


def test_resume_from_a_corrupted_path_names_the_file(capsys, finished_run, tmp_path):
    out = _copy(finished_run, tmp_path)
    f = out / "checkpoints" / "step_2" / "optimizer.bin"
    f.write_bytes(bytes(f.stat().st_size))
    argv = _run_argv(out, "--trainer.resume_from_checkpoint", str(f.parent), "--trainer.max_steps", "3")
    assert_one_line_error(capsys, pretrain.main, argv, "optimizer.bin", "digest")


def test_vocab_smaller_than_the_tokenizer(capsys, tmp_path):
    assert_one_line_error(capsys, pretrain.main, _run_argv(tmp_path, "--model.vocab_size", "10"),
                          "model.vocab_size=10")


def test_hub_errors_are_one_line(capsys, tmp_path, finished_run, monkeypatch):
    assert_one_line_error(capsys, hub.main, ["card", str(tmp_path / "nowhere")], "neither a run directory")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_one_line_error(capsys, hub.main, ["push", str(finished_run), "--repo-id", "u/x"], "offline")
    out = _copy(finished_run, tmp_path)
    (out / "final" / "model.safetensors").write_bytes(b"garbage")
    assert_one_line_error(capsys, hub.main, ["card", str(out)], "model.safetensors", "not a readable")


def test_model_card_and_summary_hold_no_absolute_paths(finished_run, tmp_path):
    card = hub.build_model_card(hub.resolve_source(finished_run))
    assert str(finished_run) not in card and str(tmp_path.parent) not in card
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["output_dir"] == "." and summary["config"] == "config.yaml"


def test_robustness_plan_error_is_one_line(capsys, tmp_path):
    code = robustness_cli.main(["plan", "--output-root", str(tmp_path), "--stages", "Z"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("argv,needle", [
    (["--optimizer.betas", "[0.9]"], "optimizer.betas"),
    (["--trainer.resume_from_checkpoint", "/nonexistent/step_3", "--trainer.output_dir", "{tmp}"], "does not exist"),
])
def test_real_subprocess_exit_2_one_line(tmp_path, argv, needle):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "pretraining" / "pretrain.py"), *TINY, *argv],
                          capture_output=True, text=True, timeout=240, cwd=REPO)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # a real process only to see the traceback
def test_debug_flag_shows_the_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "pretraining" / "pretrain.py"), *TINY,
                           "--trainer.output_dir", str(tmp_path), "--trainer.resume_from_checkpoint",
                           str(tmp_path / "nope"), "--debug"], capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "CheckpointError" in proc.stderr
