"""End-of-run artefacts: ``summary.json``, ``summary.md``, ``loss_curve.png`` and the table printed at the end.

Everything is computed from ``metrics.jsonl`` plus the trainer's counters, so the summary of a resumed run covers
the whole run, not only the last segment.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
LOSS_CURVE = "loss_curve.png"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (lines cut by a crash are skipped)."""
    records = []
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def _last(records: list[dict[str, Any]], key: str) -> Any:
    for r in reversed(records):
        if key in r:
            return r[key]
    return None


def _steady_mean(records: list[dict[str, Any]], key: str) -> float | None:
    """Mean over the second half of the logged values: skips start-up (allocation, first iterations)."""
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    if not values:
        return None
    tail = values[len(values) // 2:]
    return sum(tail) / len(tail)


def build_summary(records: list[dict[str, Any]], **facts: Any) -> dict[str, Any]:
    """Summary dict: the given facts (steps, wall time, ...) plus what the metrics say."""
    train = [r for r in records if "train/loss" in r]
    summary = {
        **facts,
        "first_train_loss": train[0]["train/loss"] if train else None,
        "final_train_loss": _last(records, "train/loss"),
        "final_eval_loss": _last(records, "eval/loss"),
        "final_eval_accuracy": _last(records, "eval/accuracy"),
        "tokens_per_sec": _steady_mean(records, "train/tokens_per_sec"),
        "steps_per_sec": _steady_mean(records, "train/steps_per_sec"),
        "tflops_per_device": _steady_mean(records, "train/tflops"),
        "mfu": _steady_mean(records, "train/mfu"),
        "peak_memory_mb": max((r["train/peak_memory_mb"] for r in records if "train/peak_memory_mb" in r),
                              default=None),
        "max_attention_logit": _last(records, "train/max_attention_logit"),
    }
    downstream = sorted({k for r in records for k in r if k.startswith("downstream/")})
    summary.update({k: _last(records, k) for k in downstream})  # latest value of each downstream metric
    return summary


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return "-" if value is None else str(value)


def summary_table(summary: dict[str, Any]) -> str:
    """A two-column Markdown table (also what is printed to the console)."""
    width = max(len(k) for k in summary)
    lines = [f"| {'metric'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k.ljust(width)} | {_fmt(v)} |" for k, v in summary.items()]
    return "\n".join(lines)


def plot_loss_curve(records: list[dict[str, Any]], path: Path) -> None:
    """Train loss per logged step, eval loss as markers; headless (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(r["step"], r["train/loss"]) for r in records if isinstance(r.get("train/loss"), (int, float))]
    evals = [(r["step"], r["eval/loss"]) for r in records if isinstance(r.get("eval/loss"), (int, float))]
    if train:
        ax.plot(*zip(*train, strict=True), label="train/loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval/loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("MLM loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_summary(output_dir: Path, summary: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """Write summary.json, summary.md and loss_curve.png into ``output_dir``."""
    output_dir = Path(output_dir)
    (output_dir / SUMMARY_JSON).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (output_dir / SUMMARY_MD).write_text(f"# Run summary: {output_dir.name}\n\n{summary_table(summary)}\n\n"
                                         f"![loss curve]({LOSS_CURVE})\n")
    plot_loss_curve(records, output_dir / LOSS_CURVE)
