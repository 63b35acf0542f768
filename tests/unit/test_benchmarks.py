"""The benchmark scripts run end to end in smoke mode and print the JSON + Markdown they promise (no timing asserts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str, env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", "--smoke", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    payload = json.loads(text[: text.index("\n}\n") + 2])  # the JSON document comes first
    assert "### " in text and "|---|" in text  # then the Markdown table
    return payload


def _finite_positive(x) -> bool:
    return isinstance(x, float) and 0 < x < float("inf")


def test_optimizer_step_reports_every_optimizer_with_ratio():
    payload = _run("optimizer_step.py")
    rows = {r["optimizer"]: r for r in payload["results"]}
    assert set(rows) == {"adamw", "adamw-decaying-wd", "adana", "dana-mk4", "dana-star", "dana-star-mk4",
                         "muonclip", "dion2", "dion2_qk", "dion"}
    assert rows["adamw"]["ratio_vs_adamw"] == 1.0
    assert all(_finite_positive(r["step_ms"]) and _finite_positive(r["ratio_vs_adamw"]) for r in rows.values())
    assert _finite_positive(rows["dion2_qk"]["qk_clip_ms"]) and "qk_clip_ms" not in rows["dion2"]


def test_optimizer_step_interleaved_rounds_give_the_same_rows():
    payload = _run("optimizer_step.py", "--interleave", "--optimizers", "adamw", "adana", "dion2_qk")
    rows = {r["optimizer"]: r for r in payload["results"]}
    assert set(rows) == {"adamw", "adana", "dion2_qk"} and payload["interleave"] is True
    assert rows["adamw"]["ratio_vs_adamw"] == 1.0 and _finite_positive(rows["dion2_qk"]["qk_clip_ms"])
    assert all(_finite_positive(r["step_ms"]) and _finite_positive(r["cpu_ms"]) for r in rows.values())
    assert rows["adamw"]["cpu_ratio_vs_adamw"] == 1.0


@pytest.mark.slow  # compiles the two DANA kernels and three probes (tens of seconds on a cold inductor cache)
def test_dana_kernel_cost_reports_kernels_floors_and_the_clock():
    payload = _run("dana_kernel_cost.py")
    rows = {r["case"]: r for r in payload["results"]}
    assert set(rows) == {"adamw", "adana", "dana-star", "memory floor", "clock: ladder + polynomial added",
                         "clock: log + exp2 added (before)", "log pass, compiled: log added",
                         "log pass, eager ATen: log added"}
    assert rows["adamw"]["ratio_vs_adamw"] == 1.0
    assert all(_finite_positive(rows[c]["ms"]) for c in ("adamw", "adana", "dana-star", "memory floor"))
    assert all(r["ms"] >= 0.0 for r in rows.values())


def test_model_throughput_compares_neobert_with_transformers_peers():
    payload = _run("model_throughput.py")
    measured = [r for r in payload["results"] if "tokens_per_sec" in r]
    kinds = {(r["model"], r["attention"], r["packed"]) for r in measured}
    assert {("neobert", "sdpa", False), ("neobert", "sdpa", True), ("bert", "sdpa", False)} <= kinds
    assert all(_finite_positive(r["tokens_per_sec"]) and _finite_positive(r["ratio_vs_bert"]) for r in measured)


@pytest.mark.slow
def test_train_throughput_runs_the_real_trainer_per_optimizer():
    payload = _run("train_throughput.py", "--optimizers", "adamw", "dion2_qk")
    rows = {r["optimizer"]: r for r in payload["results"]}
    assert set(rows) == {"adamw", "dion2_qk"}, payload
    assert all(_finite_positive(r["tokens_per_sec"]) and r["steps_measured"] >= 1 for r in rows.values()), rows
    assert rows["adamw"]["ratio_vs_adamw"] == 1.0


@pytest.mark.slow
def test_dion_comm_measures_the_spec_formula():
    proc = subprocess.run([sys.executable, "benchmarks/dion_comm.py", "--hidden", "64", "--layers", "1",
                           "--intermediate", "192", "--vocab-size", "128", "--fractions", "0.25"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(proc.stdout[: proc.stdout.index("\n}\n") + 2])
    for row in payload["results"]:
        assert row["measured_ratio"] == pytest.approx(row["formula_ratio"], rel=1e-12), row
    total = next(r for r in payload["results"] if r["matrix"] == "all block matrices")
    assert 0 < total["measured_ratio"] < 1


def test_orthogonalize_divergence_reports_mismatch_and_time_ratio():
    payload = _run("orthogonalize_divergence.py")
    rows = payload["results"]
    assert {(r["shape"], r["method"]) for r in rows} == {
        (s, m) for s in ("8x16", "32x64") for m in ("polar_express", "newton_schulz")}
    assert all(0 <= r["mismatch_fraction"] <= 1 and r["max_rel_error"] >= 0 for r in rows)
    assert all(_finite_positive(r["exact_over_fast"]) for r in rows)


@pytest.mark.slow
def test_optimizer_step_fused_dana_rows():
    payload = _run("optimizer_step.py", "--optimizers", "adamw", "adana-fused", "dana-star-mk4-fused")
    rows = {r["optimizer"]: r for r in payload["results"]}
    assert set(rows) == {"adamw", "adana-fused", "dana-star-mk4-fused"}
    assert all(_finite_positive(r["step_ms"]) and _finite_positive(r["ratio_vs_adamw"]) for r in rows.values())


def test_gpu_suite_smoke_model_and_optimizer_sections(tmp_path):
    payload = _run("gpu_suite.py", "--sections", "model", "optimizer", "--peak-tflops", "1.0", "--out", str(tmp_path))
    measured = [r for r in payload["model"] if "tokens_per_sec" in r]
    assert {(r["attention"], r["compiled"]) for r in measured} >= {("sdpa", False), ("eager", False)}
    assert all(_finite_positive(r["tflops"]) and _finite_positive(r["mfu"]) for r in measured)
    skipped = [r for r in payload["model"] if "tokens_per_sec" not in r]
    assert all(r["note"].startswith("skipped") for r in skipped)  # compile off in smoke; flash-attn absent on CPU
    backends = {r["attention"] for r in payload["model"]}
    assert backends == {"sdpa", "eager", "flash_attention_2", "varlen", "flex_attention"}
    if not torch.cuda.is_available():  # torch's varlen kernel is CUDA-only: skipped with the reason, not failed
        assert all("varlen" in r["note"] for r in skipped if r["attention"] == "varlen")
    assert payload["auto_attention"] in backends
    steps = {r["optimizer"]: r for r in payload["optimizer"]}
    assert set(steps) == {"adamw", "dion2", "dion2_qk", "muonclip", "adana", "dana-star-mk4"}
    assert steps["adamw"]["ratio_vs_adamw"] == 1.0
    assert json.loads((tmp_path / "gpu_suite.json").read_text())["device"] == payload["device"]
    assert "#### model" in (tmp_path / "gpu_suite.md").read_text()


# A bare GPU image: these packages are not installed. Setting sys.modules[name] = None makes `import name` fail and
# importlib.util.find_spec(name) return None, exactly as for a missing package (transformers probes with find_spec).
_BARE_IMAGE_SITECUSTOMIZE = """\
import sys
for _name in ("datasets", "wandb", "flash_attn"):
    sys.modules[_name] = None
"""


def _bare_image_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose Python processes, and their child processes (PYTHONPATH is inherited), lack datasets,
    wandb and flash-attn: a sitecustomize on PYTHONPATH runs at every interpreter start-up."""
    site = tmp_path / "bare_image"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_BARE_IMAGE_SITECUSTOMIZE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


@pytest.mark.slow
def test_gpu_suite_smoke_runs_without_datasets_wandb_or_flash_attn(tmp_path):
    env = _bare_image_env(tmp_path)
    for name in ("datasets", "wandb", "flash_attn"):  # the blocker really is active in a child interpreter
        probe = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=REPO, capture_output=True, text=True,
                               env=env, timeout=120)
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, (name, probe.stderr[-500:])
    payload = _run("gpu_suite.py", "--sections", "model", "trainer", "--trainer-optimizers", "adamw", "dana-star-mk4",
                   env=env)
    flash = [r for r in payload["model"] if r["attention"] == "flash_attention_2"]
    assert flash and all(r["note"].startswith("skipped: flash-attn not installed") for r in flash), flash
    rows = {r["optimizer"]: r for r in payload["trainer"]}
    assert set(rows) == {"adamw", "dana-star-mk4"}, payload
    assert all(_finite_positive(r["tokens_per_sec"]) for r in rows.values()), rows
    assert rows["adamw"]["ratio_vs_adamw"] == 1.0
    assert any(note.startswith("wandb not installed") for note in payload["notes"]), payload["notes"]
    assert not any("skipped" in note for note in payload["notes"]), payload["notes"]


@pytest.mark.slow
def test_data_throughput_reports_every_kind_world_size_and_worker_count():
    payload = _run("data_throughput.py")
    cases = {(r["kind"], r["W"], r["workers"]) for r in payload["results"]}
    assert cases == {(k, w, n) for k in ("tokenized", "map", "stream", "mixture") for w in (1, 8) for n in (0, 2)}
    assert all(_finite_positive(r["tokens_per_s_per_rank"]) for r in payload["results"])
    assert all(r["wait_ms_median"] >= 0 for r in payload["results"])
    assert payload["tokenized_file_bytes"] > 0 and "rss_anon_growth_fraction" in payload
