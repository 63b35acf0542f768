"""metrics.jsonl writer (resume truncation, non-finite values), rank-0-only logging, summary files and PNG."""

import json
import math

from neobert_pt.config.schema import WandbConfig
from neobert_pt.train.metrics import JsonlWriter, NullLogger, build_metric_logger
from neobert_pt.train.summary import LOSS_CURVE, SUMMARY_JSON, SUMMARY_MD, build_summary, read_metrics, write_summary


def test_jsonl_always_has_step_and_truncates_redone_steps_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    w = JsonlWriter(path, resume_step=None)
    for step in (1, 2, 3, 4):
        w.write(step, {"train/loss": 1.0 / step})
    w.write(5, {"train/loss": float("nan")})
    w.close()
    with open(path, "a") as f:
        f.write('{"step": 6, "train/lo')  # a line cut by SIGKILL
    records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5] and records[-1]["train/loss"] == "nan"
    w = JsonlWriter(path, resume_step=3)  # resumed from the step-3 checkpoint: steps 4.. are redone
    w.write(4, {"train/loss": 0.5})
    w.close()
    assert [(r["step"], r["train/loss"]) for r in read_metrics(path)] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.5)]
    JsonlWriter(path, resume_step=None).close()  # a fresh run starts an empty file
    assert read_metrics(path) == []


def test_only_the_writer_rank_writes(tmp_path):
    kwargs = dict(output_dir=tmp_path, max_steps=3, start_step=0, resume_step=None, wandb_cfg=WandbConfig(),
                  wandb_run_id=None, config={}, disable_tqdm=True)
    other = build_metric_logger(False, **kwargs)
    assert isinstance(other, NullLogger)
    other.log(1, {"train/loss": 1.0})
    assert not (tmp_path / "metrics.jsonl").exists()
    main = build_metric_logger(True, **kwargs)
    main.log(1, {"train/loss": 1.0})
    main.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "train/loss": 1.0}


def test_summary_files_and_loss_curve(tmp_path):
    records = [{"step": s, "train/loss": 10 - s, "train/tokens_per_sec": 100.0 * s, "train/peak_memory_mb": 5.0 + s}
               for s in range(1, 5)] + [{"step": 4, "eval/loss": 6.5, "eval/accuracy": 0.25}]
    summary = build_summary(records, steps=4, wall_time_sec=1.5)
    assert summary["first_train_loss"] == 9 and summary["final_train_loss"] == 6
    assert summary["final_eval_loss"] == 6.5 and summary["final_eval_accuracy"] == 0.25
    assert math.isclose(summary["tokens_per_sec"], 350.0)  # steady state: mean of the second half
    assert summary["peak_memory_mb"] == 9.0
    write_summary(tmp_path, summary, records)
    assert json.loads((tmp_path / SUMMARY_JSON).read_text())["steps"] == 4
    md = (tmp_path / SUMMARY_MD).read_text()
    assert "| final_eval_loss" in md and "6.5" in md
    assert (tmp_path / LOSS_CURVE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
