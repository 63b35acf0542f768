"""The robustness report: per-run table, gates with measured numbers, curves; Markdown + JSON + PNG + stdout."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from neobert_pt.robustness.gates import GateResult, all_fatal_passed
from neobert_pt.robustness.matrix import STAGE_PURPOSE, Profile, RunSpec
from neobert_pt.robustness.records import RunRecord

COLUMNS = ("stage", "variant", "seed", "mode", "role", "steps", "final train loss", "final eval loss",
           "eval acc", "tokens/s", "steps/s", "peak MB", "wall s", "status")


def run_row(run: RunSpec, rec: RunRecord, profile: Profile, resume_status: str = "") -> dict:
    """The runbook's reporting fields for one run."""
    skip = profile.warmup_fraction_for_throughput
    status = "not run" if not rec.ran else ("ok" if rec.succeeded else f"failed (exit {rec.returncode})")
    if rec.note:
        status += f": {rec.note}"
    peak = max((v for _, v in rec.series("train/peak_memory_mb")), default=None)
    return {
        "run": run.name,
        "stage": run.stage,
        "variant": run.variant,
        "seed": run.seed,
        "mode": run.mode,
        "role": run.role,
        "config": run.config,
        "overrides": " ".join(run.overrides),
        "target_steps": run.steps,
        "completed_steps": rec.completed_steps,
        "final_train_loss": rec.last("train/loss"),
        "final_eval_loss": rec.last("eval/loss"),
        "eval_accuracy": rec.last("eval/accuracy"),
        "tokens_per_sec": rec.steady_state_mean("train/tokens_per_sec", skip),
        "steps_per_sec": rec.steady_state_mean("train/steps_per_sec", skip),
        "peak_memory_mb": peak,
        "max_attention_logit": rec.last("train/max_attention_logit"),
        "downstream_pppl": rec.last("downstream/pppl/pppl"),  # trainer.downstream_suites, when configured
        "downstream_probe_accuracy": rec.last("downstream/probe/accuracy"),
        "wall_time_s": rec.wall_time_s,
        "resume_check": resume_status,
        "status": status,
        "log": rec.log_path,
    }


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}g}"
    return str(value)


def _markdown(rows: list[dict], gates: list[GateResult], profile: Profile, passed: bool) -> str:
    lines = [f"# Dion2 robustness report (profile `{profile.name}`)", "",
             f"**Overall: {'PASS' if passed else 'FAIL'}** — fatal gates {'all pass' if passed else 'failing'}.", ""]
    for stage in sorted({r["stage"] for r in rows}):
        lines += [f"## Stage {stage}: {STAGE_PURPOSE[stage]}", "",
                  "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        for r in (r for r in rows if r["stage"] == stage):
            cells = [r["stage"], r["variant"], r["seed"], r["mode"], r["role"],
                     f"{r['completed_steps']}/{r['target_steps']}", _fmt(r["final_train_loss"]),
                     _fmt(r["final_eval_loss"]), _fmt(r["eval_accuracy"]), _fmt(r["tokens_per_sec"]),
                     _fmt(r["steps_per_sec"]), _fmt(r["peak_memory_mb"]), _fmt(r["wall_time_s"]), r["status"]]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        lines.append("")
    downstream = [r for r in rows if r["downstream_pppl"] is not None or r["downstream_probe_accuracy"] is not None]
    if downstream:
        lines += ["## Downstream (trainer.downstream_suites, last checkpoint)", "",
                  "| run | final eval loss | PPPL | word-order probe accuracy |", "|---|---|---|---|"]
        lines += [f"| {r['run']} | {_fmt(r['final_eval_loss'])} | {_fmt(r['downstream_pppl'])} | "
                  f"{_fmt(r['downstream_probe_accuracy'])} |" for r in downstream]
        lines.append("")
    lines += ["## Gates", "", "| stage | gate | verdict | measured |", "|---|---|---|---|"]
    lines += [f"| {g.stage} | {g.gate} | {g.verdict}{'' if g.fatal else ' (informational)'} | {g.detail} |" for g in gates]
    lines += ["", "## Commands", ""]
    lines += [f"- `{r['run']}`: config `{r['config']}` with `{r['overrides']}`" for r in rows]
    return "\n".join(lines) + "\n"


def _plots(runs: list[RunSpec], records: dict[str, RunRecord], out_dir: Path) -> list[str]:
    """One PNG per stage: train loss (and eval loss where recorded) per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for stage in sorted({r.stage for r in runs}):
        stage_runs = [r for r in runs if r.stage == stage and records[r.name].metrics]
        if not stage_runs:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for run in stage_runs:
            rec = records[run.name]
            label = f"{run.variant} s{run.seed} {run.mode}{'' if run.role == 'train' else ' ' + run.role}"
            for ax, key in zip(axes, ("train/loss", "eval/loss"), strict=True):
                series = rec.series(key)
                if series:
                    ax.plot(*zip(*series, strict=True), label=label, marker="o" if key == "eval/loss" else None, markersize=3)
        for ax, title in zip(axes, ("train loss", "eval loss"), strict=True):
            ax.set_title(f"stage {stage}: {title}")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if ax.get_lines():
                ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"stage{stage}_curves.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written


def write_report(runs: list[RunSpec], records: dict[str, RunRecord], gates: list[GateResult], profile: Profile,
                 out_dir: Path) -> dict:
    """Write report.md, report.json and the curve PNGs; return the JSON payload."""
    out_dir.mkdir(parents=True, exist_ok=True)
    resume = {g.measured.get("run"): g.verdict for g in gates if g.stage == "E"}
    rows = [run_row(r, records[r.name], profile, resume.get(r.name, "")) for r in runs]
    passed = all_fatal_passed(gates)
    payload = {"profile": profile.name, "passed": passed, "runs": rows, "gates": [asdict(g) | {"verdict": g.verdict} for g in gates]}
    payload["plots"] = _plots(runs, records, out_dir)
    (out_dir / "report.json").write_text(json.dumps(payload, indent=2, default=str))
    (out_dir / "report.md").write_text(_markdown(rows, gates, profile, passed))
    return payload


def stdout_summary(payload: dict, out_dir: Path) -> str:
    """The one-screen summary: run counts per stage, then every gate."""
    lines = [f"Dion2 robustness matrix — profile {payload['profile']}: {'PASS' if payload['passed'] else 'FAIL'}"]
    stages: dict[str, list[dict]] = {}
    for r in payload["runs"]:
        stages.setdefault(r["stage"], []).append(r)
    for stage, rows in sorted(stages.items()):
        ok = sum(r["status"] == "ok" for r in rows)
        lines.append(f"  stage {stage}: {ok}/{len(rows)} runs ok")
    for g in payload["gates"]:
        lines.append(f"  [{g['verdict']:<4}] {g['stage']:<3} {g['gate']}: {g['detail']}")
    lines.append(f"  report: {out_dir / 'report.md'}")
    return "\n".join(lines)
