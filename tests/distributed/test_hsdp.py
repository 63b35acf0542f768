"""HSDP (2 replicas x 2 shards, 4 gloo processes) through real ``accelerate launch`` of the trainer.

One launch of ``train_variants.py`` with ``configs/accelerate/hsdp_cpu_2x2.yaml`` trains AdamW, Dion (compressed
replica sync), Dion (FSDP full-gradient sync), MuonClip (+QK-clip) and Dion2 in turn; a single-process launch and a
2-process 1-D FSDP2 launch of the same variants are the references; one real ``pretrain.py`` HSDP launch resumes
Dion from the sharded step-3 checkpoint. All of it is slow on 2 shared cores (3-4 process starts of ~20-50 s each),
so the module is marked ``slow``; the optimizer-level 4-process checks of Dion's compressed sync run in the default
suite (tests/distributed/test_dion_distributed.py).

Tolerances: the data loader gives 4 ranks x 1 row exactly the rows of 1 process x 4 rows, so only fp32 summation
order differs. AdamW: loss |d| <= 1e-5, parameters relative <= 1e-4 (as for DDP/FSDP2; measured 1e-6).
Muon/Dion2 on HSDP run the 1-D FSDP2 algorithm on 2 shards with the gradient averaged over all 4 ranks, so they
equal the 2-process FSDP2 run up to summation order: loss <= 2e-3, parameters <= 1e-1 (the orthonormal tolerance of
test_trainer_distributed.py: bf16 orthogonalisation amplifies 1e-7 gradient differences in small singular
directions). Dion compressed vs full-gradient sync: the same math up to reassociated sums (docs/specs/dion.md §2.4),
parameters <= 1e-5 abs (measured 1.9e-7 after 6 steps).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from launch import PRETRAIN, accelerate_launch, run_process  # noqa: E402
from train_variants import GLOBAL_ROWS, MAX_STEPS, SAVE_STEP, run_args  # noqa: E402

DRIVER = Path(__file__).resolve().parent / "train_variants.py"
HSDP = "hsdp_cpu_2x2.yaml"
VARIANTS = ["adamw", "dion", "dion-fullsync", "muonclip", "dion2"]
TIMEOUT_S = 480

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in r}


def _dump(run_dir: Path, rank: int) -> dict:
    return torch.load(run_dir / f"dump_rank{rank}.pt", map_location="cpu", weights_only=False)


def _rel(a: dict, b: dict) -> float:
    return max(((a[k].float() - b[k].float()).norm() / b[k].float().norm().clamp(min=1e-12)).item() for k in b)


def _launch(out: Path, names: list[str], config: str | None, world: int) -> str:
    args = [str(out), ",".join(names), "--per-device-rows", str(GLOBAL_ROWS // world)]
    if config is None:
        return run_process([sys.executable, str(DRIVER), *args], timeout_s=TIMEOUT_S, run_root=out).output
    return accelerate_launch(config, DRIVER, args, timeout_s=TIMEOUT_S, run_root=out).output


@pytest.fixture(scope="module")
def hsdp(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("hsdp")
    return out, _launch(out, VARIANTS, HSDP, 4)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    _launch(out, ["adamw"], None, 1)
    return out


@pytest.fixture(scope="module")
def fsdp_1d(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp1d")
    _launch(out, ["muonclip", "dion2"], "fsdp2_cpu_2proc.yaml", 2)
    return out


@pytest.mark.timeout(2 * TIMEOUT_S)
def test_params_are_shard_dtensors_and_replicas_stay_bit_identical(hsdp):
    out, output = hsdp
    assert output.count("mode hsdp · world size 4") == len(VARIANTS)
    for name in VARIANTS:
        dumps = [_dump(out / name, r) for r in range(4)]
        kinds = dumps[0]["kinds"]
        assert all(k["type"] == "DTensor" and k["placements"] == ["Shard(dim=0)"] and k["mesh_size"] == 2
                   for k in kinds.values()), f"{name}: not 1-D Shard(0) DTensors on the shard sub-mesh"
        # ranks (0, 1) and (2, 3) are the two replicas of the 2 x 2 mesh: same shard index, same bits.
        for a, b in ((0, 2), (1, 3)):
            for key, value in dumps[a]["local"].items():
                assert torch.equal(value, dumps[b]["local"][key]), f"{name}: replicas drifted apart in {key}"
        records = _records(out / name)
        assert sorted(records) == list(range(1, MAX_STEPS + 1))
        assert records[MAX_STEPS]["train/loss"] < records[1]["train/loss"], f"{name} did not learn"


@pytest.mark.timeout(2 * TIMEOUT_S)
def test_hsdp_adamw_equals_one_process(hsdp, single):
    out, _ = hsdp
    got, ref = _records(out / "adamw"), _records(single / "adamw")
    assert max(abs(got[s]["train/loss"] - ref[s]["train/loss"]) for s in ref) <= 1e-5
    assert _rel(_dump(out / "adamw", 0)["full"], _dump(single / "adamw", 0)["full"]) <= 1e-4


@pytest.mark.timeout(3 * TIMEOUT_S)
@pytest.mark.parametrize("name", ["muonclip", "dion2"])
def test_hsdp_orthonormal_optimizers_equal_their_1d_fsdp2_run(name, hsdp, fsdp_1d):
    out, _ = hsdp
    got, ref = _records(out / name), _records(fsdp_1d / name)
    assert max(abs(got[s]["train/loss"] - ref[s]["train/loss"]) for s in ref) <= 2e-3
    assert _rel(_dump(out / name, 0)["full"], _dump(fsdp_1d / name, 0)["full"]) <= 1e-1
    if name == "muonclip":
        assert max(r["train/max_attention_logit"] for r in got.values()) > 0


@pytest.mark.timeout(2 * TIMEOUT_S)
def test_dion_compressed_sync_equals_full_gradient_sync_with_fewer_replicate_bytes(hsdp):
    out, _ = hsdp
    compressed, full = _dump(out / "dion", 0)["full"], _dump(out / "dion-fullsync", 0)["full"]
    worst = max((compressed[k] - full[k]).abs().max().item() for k in full)
    assert worst <= 1e-5, f"compressed vs full-gradient sync differ by {worst:.2e}"
    c, f = _records(out / "dion")[MAX_STEPS], _records(out / "dion-fullsync")[MAX_STEPS]
    # Same FSDP reduce-scatter over the shard axis; fewer bytes over the replicate axis (only P, R and scalars).
    assert c["train/comm_bytes/reduce_scatter/shard"] == f["train/comm_bytes/reduce_scatter/shard"]
    assert c["train/comm_bytes/all_reduce/replicate"] < f["train/comm_bytes/all_reduce/replicate"]


@pytest.mark.timeout(2 * TIMEOUT_S)
def test_hsdp_dion_resume_is_exact_and_keeps_compressed_sync(hsdp, tmp_path):
    out, _ = hsdp
    ckpt = out / "dion" / "checkpoints" / f"step_{SAVE_STEP}"
    assert (ckpt / "pytorch_model_fsdp_0").is_dir(), "the HSDP checkpoint is not sharded (DCP)"
    resumed = tmp_path / "resumed"
    accelerate_launch(HSDP, PRETRAIN, run_args("dion", resumed, GLOBAL_ROWS // 4,
                                               ["--trainer.resume_from_checkpoint", str(ckpt)]),
                      timeout_s=TIMEOUT_S, run_root=tmp_path)
    got, ref = _records(resumed), _records(out / "dion")
    assert sorted(got) == list(range(SAVE_STEP + 1, MAX_STEPS + 1))
    for step, record in got.items():
        for key in ("train/loss", "train/grad_norm", "train/lr", "train/comm_bytes",
                    "train/comm_bytes/all_reduce/replicate"):
            assert record[key] == ref[step][key], f"step {step} {key}: {record[key]} != {ref[step][key]}"
    from safetensors.torch import load_file

    exported = load_file(resumed / "final" / "model.safetensors")
    reference = _dump(out / "dion", 0)["full"]
    for key, value in exported.items():
        assert torch.equal(value, reference[key]), f"resumed final weights differ in {key}"


@pytest.mark.timeout(TIMEOUT_S)
def test_resume_onto_another_mesh_shape_is_refused(hsdp, tmp_path):
    """A 2 x 2 HSDP checkpoint cannot continue on a 1-D FSDP2 mesh of the same 4 processes: one line, no run."""
    out, _ = hsdp
    ckpt = out / "adamw" / "checkpoints" / f"step_{SAVE_STEP}"
    hsdp_yaml = (Path(__file__).resolve().parents[2] / "configs" / "accelerate" / HSDP).read_text()
    flat = tmp_path / "fsdp2_cpu_4proc.yaml"
    flat.write_text(hsdp_yaml.split("parallelism_config:")[0])
    done = accelerate_launch(flat, PRETRAIN, run_args("adamw", tmp_path / "other", GLOBAL_ROWS // 4,
                                                      ["--trainer.resume_from_checkpoint", str(ckpt)]),
                             timeout_s=TIMEOUT_S, run_root=tmp_path, check=False)
    assert done.returncode != 0
    assert "it was written on a 'hsdp 2x2' mesh and this launch is 'fsdp2 4'" in done.output, done.output[-3000:]
    assert "[rank0]: Traceback" not in done.output, done.output[-3000:]  # (the launcher's own traceback is not ours)
