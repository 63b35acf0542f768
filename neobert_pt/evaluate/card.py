"""Evaluation results in a model card: HF ``model-index`` metadata and a readable table.

Reads the ``eval_results.json`` that ``python -m neobert_pt.evaluate`` writes (see :mod:`.results`). Pure functions
of that dict: no model, no torch.
"""

from __future__ import annotations

import math
from typing import Any

# suite → (task type, task name, dataset type, dataset name)
_SUITE_TASK = {
    "probe": ("text-classification", "Word-order probe (frozen encoder)", "neobert_pt/embedded",
              "embedded corpus (word order)"),
    "pppl": ("fill-mask", "Pseudo-perplexity", "neobert_pt/embedded", "held-out text"),
    "embeddings": ("sentence-similarity", "STS (cosine, no fine-tuning)", "local", "STS pairs"),
    "ner": ("token-classification", "Named entity recognition", "conll2003", "CoNLL-2003"),
}
_GLUE_TASK = {"stsb": "text-classification", "cola": "text-classification"}
_METRIC_TYPE = {"matthews": "matthews_correlation", "accuracy": "accuracy", "f1": "f1", "pearson": "pearson",
                "spearman": "spearmanr", "pppl": "perplexity", "sts_spearman": "spearmanr",
                "sts_pearson": "pearson", "precision": "precision", "recall": "recall", "margin": "accuracy"}
_SKIP = ("_std", "tokens", "windows", "examples", "pairs", "train_accuracy")


def _reportable(key: str, value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and not any(s in key for s in _SKIP)


def _metric(key: str, value: float) -> dict[str, Any]:
    base = key.split("/")[-1]
    kind = _METRIC_TYPE.get(base.removesuffix("_m").removesuffix("_mm").removesuffix("_test"), base)
    if base.startswith("pppl"):
        kind = "perplexity"
    return {"type": kind, "value": round(float(value), 6), "name": key}


def model_index(name: str, results: dict[str, Any]) -> list[dict[str, Any]]:
    """``model-index`` entries: one result per suite (per task for GLUE) with its reportable metrics."""
    entries = []
    for suite, block in results.get("suites", {}).items():
        metrics = {k: v for k, v in block.get("metrics", {}).items() if _reportable(k, v)}
        if suite == "glue":
            tasks = sorted({k.split("/")[0] for k in metrics if "/" in k})
            for task in tasks:
                entries.append({
                    "task": {"type": _GLUE_TASK.get(task, "text-classification"), "name": f"GLUE {task.upper()}"},
                    "dataset": {"type": "nyu-mll/glue", "name": f"GLUE {task.upper()}", "config": task,
                                "split": "validation"},
                    "metrics": [_metric(k, v) for k, v in metrics.items() if k.startswith(f"{task}/")],
                })
            continue
        task_type, task_name, ds_type, ds_name = _SUITE_TASK.get(suite, ("other", suite, "local", suite))
        if metrics:
            entries.append({"task": {"type": task_type, "name": task_name},
                            "dataset": {"type": ds_type, "name": ds_name},
                            "metrics": [_metric(k, v) for k, v in metrics.items()]})
    return [{"name": name, "results": entries}] if entries else []


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) and abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def eval_table(results: dict[str, Any]) -> list[str]:
    """Markdown lines: ``| suite | metric | value |`` with ``mean ± std`` where a ``_std`` companion exists."""
    lines = ["| suite | metric | value |", "|---|---|---|"]
    for suite, block in results.get("suites", {}).items():
        metrics = block.get("metrics", {})
        for key, value in metrics.items():
            if key.endswith("_std") or not isinstance(value, (int, float)):
                continue
            std = metrics.get(f"{key}_std")
            shown = _fmt(value) + (f" ± {_fmt(std)}" if std is not None else "")
            lines.append(f"| {suite} | {key} | {shown} |")
    return lines
