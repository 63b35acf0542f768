"""Resume on another world size with the same global batch: bit for bit (real ``pretrain.py`` launches, DDP/gloo).

Global batch 8 rows per optimizer step either way: 1 process x 4 rows x 2 accumulation, or 2 processes x 4 rows x
1 accumulation. Every forward sees the same 4 rows with the same masks (positions are global), and the DDP gradient
all-reduce of two micro-batch gradients equals their sum in one process (the x2 / /2 world-size scaling is exact),
so a run continued on the other world size reproduces the uninterrupted run exactly. Loader workers (2) in one of
the resumed runs must not change anything either.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from launch import PRETRAIN, accelerate_launch, run_process  # noqa: E402
from train_variants import MAX_STEPS, SAVE_STEP, TINY  # noqa: E402

TIMEOUT_S = 300
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _args(out: Path, processes: int, *extra: str) -> list[str]:
    accumulation = 2 // processes
    return [*TINY, "--optimizer.name", "adamw", "--optimizer.lr", "1e-3", "--trainer.per_device_train_batch_size",
            "4", "--trainer.gradient_accumulation_steps", str(accumulation), "--trainer.output_dir", str(out), *extra]


def _run(out: Path, processes: int, *extra: str) -> None:
    if processes == 1:
        run_process([sys.executable, str(PRETRAIN), *_args(out, 1, *extra)], timeout_s=TIMEOUT_S, run_root=out)
    else:
        accelerate_launch("ddp_cpu_2proc.yaml", PRETRAIN, _args(out, 2, *extra), timeout_s=TIMEOUT_S, run_root=out)


def _records(out: Path) -> dict[int, tuple[float, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["train/loss"], r["train/grad_norm"]) for r in rows if "train/loss" in r}


@pytest.mark.timeout(4 * TIMEOUT_S)
@pytest.mark.parametrize("before, after", [(1, 2), (2, 1)])
def test_resume_on_another_world_size_is_bit_exact(tmp_path, before, after):
    reference = tmp_path / "reference"
    _run(reference, before)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(reference / "checkpoints" / f"step_{SAVE_STEP}", resumed / "from")
    _run(resumed, after, "--trainer.resume_from_checkpoint", str(resumed / "from"),
         *(["--trainer.dataloader_num_workers", "2"] if after == 1 else []))
    got, ref = _records(resumed), _records(reference)
    assert sorted(got) == list(range(SAVE_STEP + 1, MAX_STEPS + 1))
    for step, values in got.items():
        assert values == ref[step], f"step {step}: {values} != {ref[step]}"
