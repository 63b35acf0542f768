"""Read what a finished (or failed) run left behind: its status, its metrics.jsonl and summary.json.

Gates and the report are computed from these records only — never from log scraping.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

STATUS_FILE = "robustness_status.json"


@dataclass
class RunRecord:
    """Everything recorded about one run, as plain values."""

    name: str
    returncode: int | None  # None: never ran (or interrupted)
    wall_time_s: float | None
    log_path: str | None
    metrics: list[dict] = field(default_factory=list)  # one dict per logged step, de-duplicated by step
    summary: dict = field(default_factory=dict)
    note: str = ""

    @property
    def ran(self) -> bool:
        return self.returncode is not None

    @property
    def succeeded(self) -> bool:
        return self.returncode == 0

    def series(self, key: str) -> list[tuple[int, float]]:
        """(step, value) for every logged step that has ``key``."""
        return [(m["step"], float(m[key])) for m in self.metrics if key in m and m[key] is not None]

    def last(self, key: str) -> float | None:
        values = self.series(key)
        return values[-1][1] if values else None

    @property
    def completed_steps(self) -> int:
        logged = max((m["step"] for m in self.metrics if "train/loss" in m), default=0)
        return max(logged, int(self.summary.get("steps", 0) or 0))

    def steady_state_mean(self, key: str, skip_fraction: float) -> float | None:
        """Mean of ``key`` after skipping the first ``skip_fraction`` of its logged values (warm-up)."""
        values = [v for _, v in self.series(key) if math.isfinite(v)]
        if not values:
            return None
        start = min(int(len(values) * skip_fraction), len(values) - 1)
        return statistics.fmean(values[start:])


def read_metrics(path: Path) -> list[dict]:
    """Parse metrics.jsonl; later records for the same step (a resumed continuation) replace earlier ones."""
    if not path.exists():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill; the run's status says what happened
        if "step" not in record:
            continue
        merged = by_step.setdefault(int(record["step"]), {"step": int(record["step"])})
        merged.update(record)
    return [by_step[s] for s in sorted(by_step)]


def read_record(name: str, output_dir: Path) -> RunRecord:
    status_path = output_dir / STATUS_FILE
    status = json.loads(status_path.read_text()) if status_path.exists() else {}
    summary_path = output_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return RunRecord(
        name=name,
        returncode=status.get("returncode"),
        wall_time_s=status.get("wall_time_s"),
        log_path=status.get("log_path"),
        metrics=read_metrics(output_dir / "metrics.jsonl"),
        summary=summary,
        note=status.get("note", ""),
    )


def write_status(output_dir: Path, **fields) -> None:
    """Atomically record how a run ended (written only when it ended: success, failure or skip)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = output_dir / (STATUS_FILE + ".tmp")
    tmp.write_text(json.dumps(fields, indent=2))
    tmp.replace(output_dir / STATUS_FILE)
