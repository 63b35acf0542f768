"""Gate evaluator on synthetic run directories: every gate passes on a healthy matrix and fails for the right reason."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from neobert_pt.robustness.gates import all_fatal_passed, evaluate
from neobert_pt.robustness.matrix import PROFILES, Selection, plan_runs
from neobert_pt.robustness.records import read_record, write_status
from neobert_pt.robustness.report import write_report

PROFILE = PROFILES["cpu"]


def _loss(variant: str, seed: int, step: int) -> float:
    # Deterministic per (seed, step) so an E "resumed" run reproduces its reference exactly.
    return 8.0 * math.exp(-step / 40) + 2.0 + 0.001 * (seed % 7) + (0.01 if variant == "muonclip" else 0.0)


def _write_run(run, *, metrics_override=None, returncode=0, final_eval=None, tps=1000.0):
    out = run.output_dir
    out.mkdir(parents=True, exist_ok=True)
    first = PROFILE.resume_step + 1 if run.role == "resumed" else 1
    lines = []
    for step in range(first, run.steps + 1):
        m = {"step": step, "train/loss": _loss(run.variant, run.seed, step), "train/lr": 1e-3 * (1 - step / 1000),
             "train/grad_norm": 1.0, "train/tokens_per_sec": tps, "train/steps_per_sec": 2.0,
             "train/peak_memory_mb": 500.0}
        if run.variant in ("muonclip", "dion2_qk"):
            m["train/max_attention_logit"] = 12.5
        if step == run.steps:
            m["eval/loss"] = final_eval if final_eval is not None else 3.0
            m["eval/accuracy"] = 0.3
        if metrics_override:
            metrics_override(step, m)
        lines.append(json.dumps(m))
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    write_status(out, returncode=returncode, wall_time_s=1.0, log_path=str(out / "log"))


@pytest.fixture
def matrix(tmp_path: Path):
    runs = plan_runs(PROFILE, Selection(), tmp_path)
    for run in runs:
        _write_run(run)
    return runs


def _evaluate(runs, strict=False):
    records = {r.name: read_record(r.name, r.output_dir) for r in runs}
    return evaluate(runs, records, PROFILE, strict=strict), records


def _gate(results, stage, contains):
    [g] = [g for g in results if g.stage == stage and contains in g.gate]
    return g


def test_healthy_matrix_passes_every_gate_and_reports(matrix, tmp_path):
    results, records = _evaluate(matrix)
    assert all_fatal_passed(results), [(g.gate, g.detail) for g in results if not g.passed]
    stages = {g.stage for g in results}
    assert {"A", "B", "C", "D", "E", "all"} <= stages
    resume = [g for g in results if g.stage == "E"]
    assert len(resume) == 4 and all(g.measured["bit_exact"] for g in resume)
    payload = write_report(matrix, records, results, PROFILE, tmp_path / "report")
    assert payload["passed"]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Stage D" in md and "| D | quality dion2 vs adamw | PASS" in md
    assert (tmp_path / "report" / "stageD_curves.png").stat().st_size > 1000
    assert json.loads((tmp_path / "report" / "report.json").read_text())["passed"] is True


def test_failed_run_fails_its_stage_gate(matrix):
    bad = next(r for r in matrix if r.stage == "B" and r.variant == "dion2")
    _write_run(bad, returncode=1)
    results, _ = _evaluate(matrix)
    gate = _gate(results, "B", "target step")
    assert not gate.passed and bad.name in gate.detail and "exit 1" in gate.detail
    assert not all_fatal_passed(results)


def test_short_run_fails_completion(matrix):
    bad = next(r for r in matrix if r.stage == "C")
    _write_run(bad, metrics_override=lambda s, m: m.pop("train/loss") if s > 5 else None)
    gate = _gate(_evaluate(matrix)[0], "C", "target step")
    assert not gate.passed and "5/20" in gate.detail


def test_nan_in_stage_d_fails_finite_gate(matrix):
    bad = next(r for r in matrix if r.stage == "D" and r.variant == "dion2_qk" and r.seed == 1337)
    _write_run(bad, metrics_override=lambda s, m: m.update({"train/grad_norm": float("nan")}) if s == 77 else None)
    gate = _gate(_evaluate(matrix)[0], "D", "NaN")
    assert not gate.passed and bad.name in gate.detail


def test_quality_regression_over_one_percent_fails(matrix):
    for run in (r for r in matrix if r.stage == "D" and r.variant == "dion2"):
        _write_run(run, final_eval=3.0 * 1.02)
    results, _ = _evaluate(matrix)
    assert not _gate(results, "D", "quality dion2 vs").passed
    assert _gate(results, "D", "quality dion2_qk").passed
    assert _gate(results, "D", "quality dion2 vs").measured["ratio"] == pytest.approx(1.02)


def test_resume_loss_mismatch_and_late_start_fail(matrix):
    resumed = [r for r in matrix if r.role == "resumed"]
    _write_run(resumed[0], metrics_override=lambda s, m: m.update({"train/loss": m["train/loss"] + 1e-6}))
    _write_run(resumed[1], metrics_override=lambda s, m: m.pop("train/loss") if s < PROFILE.resume_step + 5 else None)
    _write_run(resumed[2], metrics_override=lambda s, m: m.update({"train/lr": m["train/lr"] * 1.5}))
    results = [g for g in _evaluate(matrix)[0] if g.stage == "E"]
    by_run = {g.measured["run"]: g for g in results}
    assert "losses differ" in by_run[resumed[0].name].detail and not by_run[resumed[0].name].passed
    assert "first logged step" in by_run[resumed[1].name].detail
    assert "LR differs" in by_run[resumed[2].name].detail
    assert by_run[resumed[3].name].passed


def test_missing_max_attention_logit_fails_observability(matrix):
    bad = next(r for r in matrix if r.stage == "A" and r.variant == "dion2_qk")
    _write_run(bad, metrics_override=lambda s, m: m.pop("train/max_attention_logit"))
    gate = _gate(_evaluate(matrix)[0], "all", "max_attention_logit")
    assert not gate.passed and bad.name in gate.detail


def test_throughput_is_informational_unless_strict(matrix):
    for run in (r for r in matrix if r.stage == "D" and r.variant == "dion2"):
        _write_run(run, tps=500.0)
    results, _ = _evaluate(matrix)
    gate = _gate(results, "D", "throughput dion2 >=")
    assert not gate.passed and not gate.fatal and gate.verdict == "WARN"
    assert all_fatal_passed(results)
    strict_results, _ = _evaluate(matrix, strict=True)
    assert not all_fatal_passed(strict_results)


def test_report_shows_downstream_metrics_next_to_eval_loss(matrix, tmp_path):
    run = next(r for r in matrix if r.stage == "D")

    def downstream(step, m):
        if step == run.steps:
            m.update({"downstream/pppl/pppl": 412.5, "downstream/probe/accuracy": 0.8125})

    _write_run(run, metrics_override=downstream)
    results, records = _evaluate(matrix)
    write_report(matrix, records, results, PROFILE, tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Downstream" in md and f"| {run.name} | 3 | 412.5 | 0.8125 |" in md
    row = next(r for r in json.loads((tmp_path / "report" / "report.json").read_text())["runs"] if r["run"] == run.name)
    assert row["downstream_pppl"] == 412.5
