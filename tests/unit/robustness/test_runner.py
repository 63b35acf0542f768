"""Runner behaviour with a stand-in trainer: failures recorded and skipped over, completed runs never redone,
an interrupted matrix finishes on re-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from neobert_pt.robustness.matrix import PROFILES, Selection, plan_runs
from neobert_pt.robustness.records import read_record
from neobert_pt.robustness.runner import run_plan

FAKE_TRAINER = textwrap.dedent(
    """\
    #!{python}
    # Stands in for `python scripts/pretraining/pretrain.py CONFIG --k v ...`: logs its call, writes metrics.jsonl.
    import json, os, sys, time
    args = sys.argv[2:]
    opts = dict(zip(args[1::2], args[2::2]))
    out = opts["--trainer.output_dir"]
    with open(os.environ["FAKE_CALLS"], "a") as f:
        f.write(out + "\\n")
    if os.environ.get("FAKE_FAIL") and os.environ["FAKE_FAIL"] in out:
        sys.exit(3)
    if os.environ.get("FAKE_SLOW") and os.environ["FAKE_SLOW"] in out:
        time.sleep(60)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        for step in range(1, int(opts["--trainer.max_steps"]) + 1):
            m = {{"step": step, "train/loss": 5.0, "train/lr": 1e-3, "train/grad_norm": 1.0, "train/tokens_per_sec": 1e3}}
            if "muonclip" in out or "dion2_qk" in out:
                m["train/max_attention_logit"] = 10.0
            f.write(json.dumps(m) + "\\n")
    """
)


def _fake_python(tmp_path: Path) -> str:
    path = tmp_path / "fake_python"
    path.write_text(FAKE_TRAINER.format(python=sys.executable))
    path.chmod(0o755)
    return str(path)


def test_failed_run_is_recorded_matrix_continues_and_rerun_skips_completed(tmp_path, monkeypatch):
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    monkeypatch.setenv("FAKE_FAIL", "single-muonclip")
    sel = Selection(stages=("A",), python_bin=_fake_python(tmp_path))
    runs = plan_runs(PROFILES["cpu"], sel, tmp_path / "out")
    results = run_plan(runs, output_root=tmp_path / "out", cwd=tmp_path, echo=lambda *_: None)
    assert [results[r.name] for r in runs] == [0, 3, 0, 0]
    failed = read_record(runs[1].name, runs[1].output_dir)
    assert failed.returncode == 3 and Path(failed.log_path).exists()
    assert len(calls.read_text().splitlines()) == 4

    monkeypatch.delenv("FAKE_FAIL")
    again = run_plan(runs, output_root=tmp_path / "out", cwd=tmp_path, echo=lambda *_: None)
    assert list(again) == [runs[1].name]  # only the failed run is retried
    assert len(calls.read_text().splitlines()) == 5


def test_interrupted_matrix_finishes_on_rerun_without_redoing_runs(tmp_path):
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "FAKE_CALLS": str(calls), "FAKE_SLOW": "single-dion2-"}
    cmd = [sys.executable, "-m", "neobert_pt.robustness", "run", "--profile", "cpu", "--stages", "A",
           "--output-root", str(tmp_path / "out"), "--python-bin", _fake_python(tmp_path)]
    repo = Path(__file__).resolve().parents[3]
    # SIGINT back to its default in the child: a background job of a non-interactive shell inherits it ignored.
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while time.time() < deadline and (not calls.exists() or len(calls.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    done_before = calls.read_text().splitlines()
    assert len(done_before) == 3  # adamw, muonclip finished; dion2 interrupted

    env.pop("FAKE_SLOW")
    rerun = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    all_calls = calls.read_text().splitlines()
    new_calls = all_calls[len(done_before):]
    assert len(new_calls) == 2 and all("adamw" not in c and "muonclip" not in c for c in new_calls)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["passed"] and all(r["status"] == "ok" for r in report["runs"])
