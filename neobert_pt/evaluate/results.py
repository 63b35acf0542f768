"""Results files next to the model: ``eval_results.json`` (merged across invocations) and ``eval_results.md``.

JSON layout: ``{"model": spec, "step": N|null, "suites": {suite: {"metrics": {name: number}, ...details}}}``. The
flat ``metrics`` of every suite are what the model card, ``model-index`` and the trainer's ``downstream/`` keys use.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from neobert_pt.evaluate.loading import RESULTS_JSON, RESULTS_MD


def read_results(directory: Path) -> dict[str, Any] | None:
    path = Path(directory) / RESULTS_JSON
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) and abs(value) < 1e4 else f"{value:.4g}"
    return "-" if value is None else str(value)


def results_markdown(results: dict[str, Any]) -> str:
    """One metric table per suite (the recipe of fine-tuning suites is shown as YAML below its table)."""
    lines = [f"# Evaluation of {results.get('model')}", ""]
    if results.get("step") is not None:
        lines += [f"Checkpoint step: {results['step']}", ""]
    for suite, block in results.get("suites", {}).items():
        lines += [f"## {suite}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in block.get("metrics", {}).items()]
        if block.get("recipe"):
            import yaml

            lines += ["", "Recipe:", "", "```yaml", yaml.safe_dump(block["recipe"], sort_keys=False).rstrip(), "```"]
        lines.append("")
    return "\n".join(lines)


def write_results(directory: Path, spec: str, step: int | None, suites: dict[str, dict[str, Any]]) -> Path:
    """Merge ``suites`` into ``directory/eval_results.json`` (other suites kept) and rewrite the Markdown."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    results = read_results(directory) or {"model": spec, "step": step, "suites": {}}
    results.update(model=spec, step=step, updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    results["suites"].update(suites)
    tmp = directory / (RESULTS_JSON + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    tmp.replace(directory / RESULTS_JSON)
    (directory / RESULTS_MD).write_text(results_markdown(results))
    return directory / RESULTS_JSON
