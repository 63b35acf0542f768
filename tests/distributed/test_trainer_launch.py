"""First end-to-end trainer launches under accelerate on 2 gloo processes: DDP and FSDP2 (params really DTensors)
reproduce the single-process losses of the same global batch (tolerance 1e-5: only the reduction order differs)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = ("--model.hidden_size 32 --model.num_hidden_layers 1 --model.num_attention_heads 2 --model.intermediate_size 64 "
        "--dataset.max_seq_length 32 --dataset.max_documents 30 --trainer.gradient_accumulation_steps 2 "
        "--trainer.max_steps 3 --trainer.logging_steps 1 --trainer.eval_steps 3 --trainer.eval_max_batches 2 "
        "--trainer.save_steps 3 --trainer.disable_tqdm true --seed 3 --wandb.mode disabled").split()
CHECK_DTENSOR = "import neobert_pt.train.distributed as d; f = d.fsdp_mesh; d.fsdp_mesh = lambda m: print('DTENSOR_MESH', f(m)) or f(m)"


def launch(out: Path, config: str | None, rows: int) -> tuple[list[float], str]:
    script = ["scripts/pretraining/pretrain.py", "configs/pretraining/pretrain_tiny.yaml", *TINY,
              "--trainer.per_device_train_batch_size", str(rows), "--trainer.output_dir", str(out)]
    if config is None:
        cmd = [sys.executable, *script]
    else:
        runner = f"{CHECK_DTENSOR}; import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
        Path(out).mkdir(parents=True)
        (Path(out) / "run.py").write_text(runner.replace("; ", "\n"))
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, str(Path(out) / "run.py"),
               *script]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    logs = "".join(p.read_text() for p in sorted((out / "logs").glob("*.log"))) if (out / "logs").is_dir() else ""
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:] + logs
    losses = [r["train/loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "train/loss" in r]
    return losses, done.stdout + done.stderr


@pytest.mark.distributed
def test_ddp_and_fsdp2_match_single_process(tmp_path):
    single, _ = launch(tmp_path / "single", None, rows=4)
    ddp, _ = launch(tmp_path / "ddp", "configs/accelerate/ddp_cpu_2proc.yaml", rows=2)
    fsdp, out = launch(tmp_path / "fsdp", "configs/accelerate/fsdp2_cpu_2proc.yaml", rows=2)
    assert out.count("DTENSOR_MESH") == 2, "FSDP2 params are not DTensors on both ranks"
    assert "mode fsdp2" in out
    assert ddp == pytest.approx(single, abs=1e-5) and fsdp == pytest.approx(single, abs=1e-5)
    assert (tmp_path / "fsdp" / "checkpoints" / "step_3" / "rank_state_1.pt").is_file()
    assert not list((tmp_path / "fsdp" / "final").glob("_fsdp*"))
