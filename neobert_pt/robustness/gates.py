"""The robustness gates of docs/robustness.md, computed from each run's recorded metrics.

Each gate yields a :class:`GateResult` with the measured numbers, so a FAIL says why. Fatal gates decide the
runner's exit code; informational gates (throughput unless ``strict``) are reported only.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from neobert_pt.robustness.matrix import Profile, RunSpec
from neobert_pt.robustness.records import RunRecord

QUALITY_MAX_REGRESSION = 0.01  # dion2 / dion2_qk final eval loss may be at most 1% above adamw's (seed average)
THROUGHPUT_FLOORS = {"dion2": 0.85, "dion2_qk": 0.70}  # fraction of adamw tokens/s (runbook guardrail)
CLIPPED_VARIANTS = ("muonclip", "dion2_qk")
MAX_LOGIT_KEY = "train/max_attention_logit"
# Resume loss tolerance: exact on CPU (deterministic fp32 kernels); on GPU a stated relative tolerance.
RESUME_LOSS_RTOL = {"cpu": 0.0, "paper": 2e-2}
RESUME_LR_RTOL = 1e-9


@dataclass
class GateResult:
    stage: str
    gate: str
    passed: bool
    fatal: bool = True
    detail: str = ""
    measured: dict = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        if self.passed:
            return "PASS"
        return "FAIL" if self.fatal else "WARN"


def _finite(values) -> bool:
    return all(math.isfinite(v) for v in values)


def gate_completion(stage: str, runs: list[RunSpec], records: dict[str, RunRecord]) -> GateResult:
    """A/B/C: every run reached its target step with exit code 0."""
    bad = []
    for run in runs:
        rec = records[run.name]
        if not rec.succeeded or rec.completed_steps < run.steps:
            bad.append(f"{run.name} (exit {rec.returncode}, {rec.completed_steps}/{run.steps} steps{', ' + rec.note if rec.note else ''})")
    ok = bool(runs) and not bad
    detail = f"{len(runs) - len(bad)}/{len(runs)} runs reached their target step" + (f"; failed: {'; '.join(bad)}" if bad else "")
    return GateResult(stage, "all runs reach target step", ok, detail=detail,
                      measured={"completed": len(runs) - len(bad), "total": len(runs)})


def gate_finite(stage: str, runs: list[RunSpec], records: dict[str, RunRecord]) -> GateResult:
    """D: no NaN/Inf in loss or grad norm at any logged step, and no update skipped by the non-finite guard."""
    bad = []
    for run in runs:
        rec = records[run.name]
        losses = [v for _, v in rec.series("train/loss")]
        norms = [v for _, v in rec.series("train/grad_norm")]
        skipped = max([v for _, v in rec.series("train/nonfinite_skipped")] + [float(rec.summary.get("nonfinite_skipped", 0) or 0)])
        if not _finite(losses) or not _finite(norms) or skipped > 0:
            bad.append(f"{run.name} (non-finite loss/grad-norm or {int(skipped)} skipped updates)")
        if not losses:
            bad.append(f"{run.name} (no loss recorded)")
    return GateResult(stage, "no NaN/Inf in loss or grad norm", bool(runs) and not bad,
                      detail="; ".join(bad) or f"{len(runs)} runs scanned, all finite")


def gate_quality(runs: list[RunSpec], records: dict[str, RunRecord]) -> list[GateResult]:
    """D: seed-averaged final eval loss of dion2 and dion2_qk within 1% of adamw's."""
    def seed_avg(variant: str) -> float | None:
        values = [records[r.name].last("eval/loss") for r in runs if r.variant == variant]
        values = [v for v in values if v is not None]
        return statistics.fmean(values) if values else None

    baseline = seed_avg("adamw")
    results = []
    for variant in ("dion2", "dion2_qk"):
        if not any(r.variant == variant for r in runs):
            continue
        value = seed_avg(variant)
        if baseline is None or value is None:
            results.append(GateResult("D", f"quality {variant} vs adamw", False,
                                      detail=f"missing final eval loss (adamw={baseline}, {variant}={value})"))
            continue
        ratio = value / baseline
        results.append(GateResult(
            "D", f"quality {variant} vs adamw", ratio <= 1 + QUALITY_MAX_REGRESSION,
            detail=f"final eval loss {value:.4f} vs adamw {baseline:.4f} (ratio {ratio:.4f}, limit {1 + QUALITY_MAX_REGRESSION:.2f})",
            measured={"variant_eval_loss": value, "adamw_eval_loss": baseline, "ratio": ratio}))
    return results


def gate_throughput(runs: list[RunSpec], records: dict[str, RunRecord], profile: Profile,
                    strict: bool) -> list[GateResult]:
    """Steady-state tokens/s of dion2 / dion2_qk as a fraction of adamw's, from the same stage and runtime."""
    def mean_tps(variant: str) -> float | None:
        values = [records[r.name].steady_state_mean("train/tokens_per_sec", profile.warmup_fraction_for_throughput)
                  for r in runs if r.variant == variant]
        values = [v for v in values if v]
        return statistics.fmean(values) if values else None

    baseline = mean_tps("adamw")
    results = []
    for variant, floor in THROUGHPUT_FLOORS.items():
        if not any(r.variant == variant for r in runs):
            continue
        value = mean_tps(variant)
        if not baseline or value is None:
            results.append(GateResult(runs[0].stage, f"throughput {variant}", False, fatal=strict,
                                      detail=f"missing tokens/s (adamw={baseline}, {variant}={value})"))
            continue
        ratio = value / baseline
        results.append(GateResult(
            runs[0].stage, f"throughput {variant} >= {floor:.0%} of adamw", ratio >= floor, fatal=strict,
            detail=f"{value:,.0f} vs {baseline:,.0f} tokens/s (ratio {ratio:.3f})",
            measured={"tokens_per_sec": value, "adamw_tokens_per_sec": baseline, "ratio": ratio}))
    return results


def gate_resume(resumed: RunSpec, reference: RunSpec, records: dict[str, RunRecord], profile: Profile) -> GateResult:
    """E: the resumed run starts right after the checkpoint step, follows the same LR schedule and the same losses."""
    res, ref = records[resumed.name], records[reference.name]
    label = f"resume {resumed.mode} {resumed.variant}"
    run_id = {"run": resumed.name}
    if not ref.succeeded:
        return GateResult("E", label, False, detail=f"reference run {reference.name} failed (exit {ref.returncode})",
                          measured=run_id)
    if not res.succeeded:
        return GateResult("E", label, False, detail=f"resumed run failed (exit {res.returncode}) {res.note}".strip(),
                          measured=run_id)
    resume_step = profile.resume_step
    res_steps = [m["step"] for m in res.metrics if "train/loss" in m]
    if not res_steps:
        return GateResult("E", label, False, detail="resumed run logged no training step", measured=run_id)
    first = min(res_steps)
    problems = []
    if not resume_step < first <= resume_step + profile.logging_steps:
        problems.append(f"first logged step {first}, expected in ({resume_step}, {resume_step + profile.logging_steps}]")
    if res.completed_steps < resumed.steps:
        problems.append(f"stopped at {res.completed_steps}/{resumed.steps}")
    ref_lr, ref_loss = dict(ref.series("train/lr")), dict(ref.series("train/loss"))
    lr_err = max((abs(v - ref_lr[s]) / max(abs(ref_lr[s]), 1e-30) for s, v in res.series("train/lr") if s in ref_lr), default=None)
    rtol = RESUME_LOSS_RTOL.get(profile.name, RESUME_LOSS_RTOL["paper"])
    loss_pairs = [(v, ref_loss[s]) for s, v in res.series("train/loss") if s in ref_loss]
    loss_err = max((abs(a - b) / max(abs(b), 1e-30) for a, b in loss_pairs), default=None)
    if lr_err is None or lr_err > RESUME_LR_RTOL:
        problems.append(f"LR differs from the uninterrupted schedule (max rel err {lr_err})")
    if loss_err is None or loss_err > rtol:
        problems.append(f"losses differ from the uninterrupted run (max rel err {loss_err}, tolerance {rtol})")
    exact = loss_err == 0.0
    detail = (f"starts at step {first} (checkpoint {resume_step}); {len(loss_pairs)} steps compared; "
              f"max rel loss diff {loss_err!r} ({'bit-exact' if exact else f'tolerance {rtol}'}); max rel LR diff {lr_err!r}")
    if problems:
        detail = "; ".join(problems) + " — " + detail
    return GateResult("E", label, not problems, detail=detail,
                      measured={**run_id, "first_step": first, "loss_max_rel_diff": loss_err, "lr_max_rel_diff": lr_err,
                                "bit_exact": exact, "steps_compared": len(loss_pairs)})


def gate_observability(runs: list[RunSpec], records: dict[str, RunRecord]) -> GateResult | None:
    """Clipped variants must record train/max_attention_logit (finite) in their metrics."""
    clipped = [r for r in runs if r.variant in CLIPPED_VARIANTS and records[r.name].succeeded]
    if not clipped:
        return None
    missing = [r.name for r in clipped
               if not records[r.name].series(MAX_LOGIT_KEY) or not _finite(v for _, v in records[r.name].series(MAX_LOGIT_KEY))]
    return GateResult("all", f"{MAX_LOGIT_KEY} recorded for {'/'.join(CLIPPED_VARIANTS)}", not missing,
                      detail=f"missing in: {', '.join(missing)}" if missing else f"present in all {len(clipped)} clipped runs")


def evaluate(runs: list[RunSpec], records: dict[str, RunRecord], profile: Profile, *, strict: bool = False) -> list[GateResult]:
    """Every gate that the planned runs allow, in stage order."""
    by_stage: dict[str, list[RunSpec]] = {}
    for run in runs:
        by_stage.setdefault(run.stage, []).append(run)
    results: list[GateResult] = []
    for stage in ("A", "B", "C"):
        if by_stage.get(stage):
            results.append(gate_completion(stage, by_stage[stage], records))
    if by_stage.get("D"):
        d_runs = by_stage["D"]
        results.append(gate_completion("D", d_runs, records))
        results.append(gate_finite("D", d_runs, records))
        results.extend(gate_quality(d_runs, records))
    throughput_stage = by_stage.get("D") or by_stage.get("A")
    if throughput_stage:
        results.extend(gate_throughput(throughput_stage, records, profile, strict))
    names = {r.name: r for r in runs}
    for run in by_stage.get("E", []):
        if run.role == "resumed":
            results.append(gate_resume(run, names[run.reference], records, profile))
    obs = gate_observability(runs, records)
    if obs:
        results.append(obs)
    return results


def all_fatal_passed(results: list[GateResult]) -> bool:
    return all(r.passed for r in results if r.fatal)
