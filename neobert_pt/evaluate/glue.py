"""GLUE fine-tuning: CoLA, SST-2, MRPC, STS-B, QQP, MNLI (matched / mismatched), QNLI, RTE.

Data is ``datasets.load_dataset(recipe.dataset, task)`` (the standard GLUE dataset) or, with ``--glue-data DIR``,
``DIR/<task>/`` holding the same columns (a ``save_to_disk`` folder or ``train`` / ``validation*`` files). Every
(task, lr, seed) run starts from the pretrained weights with a fresh head (``NeoBERTForSequenceClassification``,
one regression output for STS-B), trains on ``train`` and is scored on the validation split(s) with the task's GLUE
metrics. Per task the learning rate with the best mean primary metric over seeds is kept and reported as mean ± std.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neobert_pt.evaluate import metrics as M
from neobert_pt.evaluate.data import load_splits
from neobert_pt.evaluate.errors import EvalError
from neobert_pt.evaluate.finetune import assign_runs, load_recipe, mean_std, predict, train

DEFAULT_RECIPE = Path(__file__).resolve().parents[2] / "configs" / "evaluation" / "glue.yaml"


@dataclass(frozen=True)
class GlueTask:
    text_a: str
    text_b: str | None
    num_labels: int  # 1 = regression
    metrics: tuple[str, ...]  # first = primary (selects the learning rate)
    eval_splits: tuple[str, ...] = ("validation",)


TASKS = {
    "cola": GlueTask("sentence", None, 2, ("matthews",)),
    "sst2": GlueTask("sentence", None, 2, ("accuracy",)),
    "mrpc": GlueTask("sentence1", "sentence2", 2, ("f1", "accuracy")),
    "stsb": GlueTask("sentence1", "sentence2", 1, ("pearson", "spearman")),
    "qqp": GlueTask("question1", "question2", 2, ("accuracy", "f1")),
    "mnli": GlueTask("premise", "hypothesis", 3, ("accuracy",), ("validation_matched", "validation_mismatched")),
    "qnli": GlueTask("question", "sentence", 2, ("accuracy",)),
    "rte": GlueTask("sentence1", "sentence2", 2, ("accuracy",)),
}
SPLIT_TAG = {"validation": "", "validation_matched": "_m", "validation_mismatched": "_mm"}


def score(task: GlueTask, logits: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    if task.num_labels == 1:
        pred = logits[:, 0]
        return {"pearson": M.pearson(pred, gold), "spearman": M.spearman(pred, gold)}
    pred = logits.argmax(-1)
    fns = {"matthews": M.matthews, "accuracy": M.accuracy, "f1": M.f1_binary}
    return {name: fns[name](pred, gold) for name in task.metrics}


def encode_split(ds, task: GlueTask, tokenizer, max_length: int, limit: int | None) -> list[dict[str, Any]]:
    missing = [c for c in (task.text_a, task.text_b, "label") if c and c not in ds.column_names]
    if missing:
        raise EvalError(f"GLUE data lacks column(s) {', '.join(missing)} (has {', '.join(ds.column_names)})")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    a = list(ds[task.text_a])  # datasets >= 4 returns a lazy Column
    b = list(ds[task.text_b]) if task.text_b else None
    enc = tokenizer(a, b, truncation=True, max_length=max_length) if b else \
        tokenizer(a, truncation=True, max_length=max_length)
    labels = [float(x) if task.num_labels == 1 else int(x) for x in list(ds["label"])]
    return [{"input_ids": ids, "labels": y} for ids, y in zip(enc["input_ids"], labels, strict=True) if y != -1]


def run_glue(model_dir: Path, tokenizer, *, recipe_path: Path | None = None, tasks: list[str] | None = None,
             data_dir: Path | None = None, device=None, progress: bool = True) -> dict[str, Any]:
    import torch

    from neobert_pt.modeling import NeoBERTForSequenceClassification

    recipe, raw = load_recipe(recipe_path, DEFAULT_RECIPE)
    tasks = tasks or recipe.tasks or list(TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise EvalError(f"unknown GLUE task(s) {', '.join(unknown)}; valid: {', '.join(TASKS)}")
    device = device or torch.device("cpu")
    data: dict[str, tuple[list, dict[str, list]]] = {}
    for name in tasks:
        task = TASKS[name]
        local = data_dir / name if data_dir is not None else None
        if local is not None and not local.exists():
            raise EvalError(f"--glue-data {data_dir}: no folder {local} for task '{name}'")
        splits = load_splits(recipe.dataset or "nyu-mll/glue", name, local, "--glue-data")
        need = ("train", *task.eval_splits)
        absent = [s for s in need if s not in splits]
        if absent:
            raise EvalError(f"GLUE task '{name}': split(s) {', '.join(absent)} missing (have {', '.join(splits)})")
        data[name] = (encode_split(splits["train"], task, tokenizer, recipe.max_length, recipe.max_train_examples),
                      {s: encode_split(splits[s], task, tokenizer, recipe.max_length, recipe.max_eval_examples)
                       for s in task.eval_splits})

    def one_run(run: tuple[str, float, int]) -> dict[str, Any]:
        name, lr, seed = run
        task = TASKS[name]
        torch.manual_seed(seed)  # the head's init
        model = NeoBERTForSequenceClassification.from_pretrained(model_dir, num_labels=task.num_labels)
        model.config.problem_type = "regression" if task.num_labels == 1 else "single_label_classification"
        train(model, data[name][0], recipe, lr=lr, seed=seed, pad_id=tokenizer.pad_token_id, label_pad=None,
              device=device, progress=progress, desc=f"{name} lr={lr:g} seed={seed}")
        result = {}
        for split, rows in data[name][1].items():
            logits = torch.stack(predict(model, rows, batch_size=recipe.eval_batch_size,
                                         pad_id=tokenizer.pad_token_id, device=device)).numpy()
            gold = np.asarray([r["labels"] for r in rows])
            result.update({f"{k}{SPLIT_TAG[split]}": v for k, v in score(task, logits, gold).items()})
        return result

    runs = [(name, lr, seed) for name in tasks for lr in recipe.learning_rates for seed in recipe.seeds]
    results = assign_runs(runs, one_run)
    metrics_out: dict[str, float] = {}
    per_task: dict[str, Any] = {}
    for name in tasks:
        task = TASKS[name]
        primary = f"{task.metrics[0]}{SPLIT_TAG[task.eval_splits[0]]}"
        by_lr = {lr: [r for (t, lr_, _), r in zip(runs, results, strict=True) if t == name and lr_ == lr]
                 for lr in recipe.learning_rates}
        best_lr = max(by_lr, key=lambda lr: mean_std([r[primary] for r in by_lr[lr]])[0])
        per_task[name] = {"best_lr": best_lr, "train_examples": len(data[name][0]),
                          "runs": [{"lr": lr, "seed": s, **r} for (t, lr, s), r in zip(runs, results, strict=True)
                                   if t == name]}
        for key in by_lr[best_lr][0]:
            mean, std = mean_std([r[key] for r in by_lr[best_lr]])
            metrics_out[f"{name}/{key}"] = mean
            metrics_out[f"{name}/{key}_std"] = std
    primaries = [metrics_out[f"{n}/{TASKS[n].metrics[0]}{SPLIT_TAG[TASKS[n].eval_splits[0]]}"] for n in tasks]
    metrics_out["average"] = float(np.mean(primaries))
    recipe_out = {**asdict(recipe), **{k: v for k, v in raw.items()}, "tasks": tasks}
    return {"metrics": metrics_out, "recipe": recipe_out, "tasks": per_task}
