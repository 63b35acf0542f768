"""The trainer under real ``accelerate launch`` on 2 gloo processes (DDP and FSDP2) against one process.

Launches (each with a timeout; a failure prints the launcher output and every rank's ``logs/rank_<r>.log``):
one single-process reference of every variant (global batch 4 = 1 x 4 rows), one DDP launch and one FSDP2 launch
that train every variant in turn (2 x 2 rows), one real ``pretrain.py`` FSDP2 launch resuming ``latest`` (step 6
corrupted, so both ranks fall back to step 3; only rank 0 hashes), and one
fresh interpreter loading the FSDP2 export with ``AutoModelForMaskedLM``.

Tolerances (measured, then given ~10x headroom). The data loader gives 2 ranks x B rows exactly the rows and masks
of 1 process x 2B rows, so the only difference is fp32 summation order (per-rank sums + all-reduce vs one sum):
* element-wise optimizers (AdamW, the DANA family): loss |d| <= 1e-5 (measured <= 1.1e-6), parameters relative
  Frobenius error per tensor <= 1e-4 (measured <= 4e-5);
* orthonormal optimizers (MuonClip, Dion2): the orthogonaliser maps every singular value of the update to ~1, so
  1e-7 gradient differences in the small-singular-value directions of these low-rank (128-token) gradients become
  O(1) differences there, and it runs in bf16. Loss |d| <= 2e-3 (measured <= 1.3e-4), parameters <= 1e-1
  (measured <= 2e-2). A wrong reduction (a rank using only its own gradient) moves both far more.
DDP replicas are compared bit for bit (every rank applies the same all-reduced gradient).
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from launch import PRETRAIN, accelerate_launch, child_env, run_process  # noqa: E402
from train_variants import CLIP_THRESHOLD, CLIPPING, GLOBAL_ROWS, MAX_STEPS, SAVE_STEP, run_args  # noqa: E402

DRIVER = Path(__file__).resolve().parent / "train_variants.py"
DDP_VARIANTS = ["adamw", "adana", "dana-mk4", "dana-star", "dana-star-mk4", "adamw-decaying-wd", "muonclip",
                "dion2", "dion2-qk", "adamw-phases"]
FSDP_VARIANTS = ["adamw", "dana-star-mk4", "dion2", "dion2-qk", "dion2-local"]
ORTHONORMAL = ("muonclip", "dion2", "dion2-qk")
LAUNCH_TIMEOUT_S = 240
ELEMENTWISE_TOL = {"loss": 1e-5, "param": 1e-4}
ORTHONORMAL_TOL = {"loss": 2e-3, "param": 1e-1}

pytestmark = pytest.mark.distributed


def _train_records(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "train/loss" in r}


def _dump(run_dir: Path, rank: int) -> dict:
    return torch.load(run_dir / f"dump_rank{rank}.pt", map_location="cpu", weights_only=False)


def _relative_errors(full: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    assert full.keys() == ref.keys()
    return {k: ((full[k].float() - ref[k].float()).norm() / ref[k].float().norm().clamp(min=1e-12)).item()
            for k in ref}


def _launch_variants(out: Path, names: list[str], accelerate_config: str | None) -> str:
    args = [str(out), ",".join(names), "--per-device-rows", str(GLOBAL_ROWS // (1 if accelerate_config is None else 2))]
    if accelerate_config is None:
        return run_process([sys.executable, str(DRIVER), *args], timeout_s=LAUNCH_TIMEOUT_S, run_root=out).output
    return accelerate_launch(accelerate_config, DRIVER, args, timeout_s=LAUNCH_TIMEOUT_S, run_root=out).output


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    _launch_variants(out, list(dict.fromkeys(DDP_VARIANTS + FSDP_VARIANTS)), None)
    return out


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("ddp")
    return out, _launch_variants(out, DDP_VARIANTS, "ddp_cpu_2proc.yaml")


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("fsdp")
    return out, _launch_variants(out, FSDP_VARIANTS, "fsdp2_cpu_2proc.yaml")


def _assert_matches_single(name: str, run_dir: Path, ref_dir: Path) -> None:
    tol = ORTHONORMAL_TOL if name in ORTHONORMAL else ELEMENTWISE_TOL
    got, ref = _train_records(run_dir), _train_records(ref_dir)
    assert sorted(got) == sorted(ref) == list(range(1, MAX_STEPS + 1))
    loss_err = max(abs(got[s]["train/loss"] - ref[s]["train/loss"]) for s in ref)
    assert loss_err <= tol["loss"], f"{name}: loss differs from one process by {loss_err:.2e}"
    errors = _relative_errors(_dump(run_dir, 0)["full"], _dump(ref_dir, 0)["full"])
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol["param"], f"{name}: {worst} differs from one process by {errors[worst]:.2e}"
    assert ref[MAX_STEPS]["train/loss"] < ref[1]["train/loss"], f"{name}: the reference run did not learn"


def _assert_clipped(name: str, run_dir: Path) -> None:
    """The pre-clip max attention logit exceeded tau on some step, so QK-clip rescaled W_q/W_k there."""
    logits = [r.get("train/max_attention_logit") for r in _train_records(run_dir).values()]
    assert all(v is not None for v in logits), f"{name}: QK-clip observed no step: {logits}"
    assert max(logits) > CLIP_THRESHOLD, f"{name}: max attention logit {max(logits)} never exceeded tau"


@pytest.mark.timeout(3 * LAUNCH_TIMEOUT_S)
@pytest.mark.parametrize("name", DDP_VARIANTS)
def test_ddp_replicas_identical_and_match_one_process(name, ddp, single):
    out, output = ddp
    assert output.count("mode ddp · world size 2") == len(DDP_VARIANTS)
    rank0, rank1 = _dump(out / name, 0), _dump(out / name, 1)
    assert rank0["mode"] == rank1["mode"] == "ddp" and rank0["world_size"] == 2
    for key, value in rank0["local"].items():
        assert torch.equal(value, rank1["local"][key]), f"{name}: replicas drifted apart in {key}"
    _assert_matches_single(name, out / name, single / name)
    if name in CLIPPING:
        _assert_clipped(name, out / name)
    for rank in (0, 1):
        assert (out / name / "logs" / f"rank_{rank}.log").is_file()
    assert (out / name / "checkpoints" / f"step_{MAX_STEPS}" / "rank_state_1.json").is_file()


@pytest.mark.timeout(3 * LAUNCH_TIMEOUT_S)
def test_fsdp2_params_are_dtensor_shards_and_every_variant_trains(fsdp):
    out, output = fsdp
    assert output.count("mode fsdp2 · world size 2") == len(FSDP_VARIANTS)
    for name in FSDP_VARIANTS:
        for rank in (0, 1):
            kinds = _dump(out / name, rank)["kinds"]
            not_sharded = {k: v for k, v in kinds.items()
                           if v["type"] != "DTensor" or v["placements"] != ["Shard(dim=0)"] or v["mesh_size"] != 2}
            assert not not_sharded, f"{name}: parameters that are not Shard(0) DTensors on rank {rank}: {not_sharded}"
            assert all(0 < v["local_rows"] < v["rows"] for v in kinds.values()), f"{name}: a tensor is not split"
        emb = "model.embeddings.weight"
        halves = [_dump(out / name, r)["local"][emb] for r in (0, 1)]
        assert torch.equal(torch.cat(halves), _dump(out / name, 0)["full"][emb]), "shards do not assemble the export"
        records = _train_records(out / name)
        assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in records.values())
        assert records[MAX_STEPS]["train/loss"] < records[1]["train/loss"], f"{name} did not learn"
        if name in CLIPPING:
            _assert_clipped(name, out / name)


# Dion2 under FSDP2 follows upstream's sharded semantics (docs/specs/dion2_muonclip.md §1.10.2): it selects along the
# shard dim (rows, even of tall matrices such as ffn gate/up) and orthogonalises the fused QKV whole, while one process
# selects columns of tall matrices and works per Q/K/V projection. So FSDP2 is not expected to equal one process: its
# exact math is checked against a sharded simulation in test_dion2_distributed.py; here the trajectory must stay close.
DION2_FSDP2_LOSS_TOL = 5e-2


@pytest.mark.timeout(3 * LAUNCH_TIMEOUT_S)
@pytest.mark.parametrize("name", ["adamw", "dana-star-mk4", "dion2", "dion2-qk"])
def test_fsdp2_matches_one_process(name, fsdp, single):
    out, _ = fsdp
    if name.startswith("dion2"):
        got, ref = _train_records(out / name), _train_records(single / name)
        loss_err = max(abs(got[s]["train/loss"] - ref[s]["train/loss"]) for s in ref)
        assert loss_err <= DION2_FSDP2_LOSS_TOL, f"{name}: FSDP2 loss strays from one process by {loss_err:.2e}"
        return
    _assert_matches_single(name, out / name, single / name)


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT_S)
def test_fsdp2_resume_from_sharded_checkpoint_continues_the_uninterrupted_run(fsdp, tmp_path):
    """A real ``pretrain.py`` launch resumes ``latest`` whose newest checkpoint (step 6) is corrupted: rank 0 alone
    hashes the checkpoints, both ranks fall back to the sharded step-3 checkpoint and reproduce steps 4-6 exactly."""
    out, _ = fsdp
    name = "dion2-qk"  # sharded Dion2 error-feedback state + AdamW moments + QK-clip
    ckpt = out / name / "checkpoints" / f"step_{SAVE_STEP}"
    assert (ckpt / "pytorch_model_fsdp_0").is_dir(), "the FSDP2 checkpoint is not sharded (DCP)"
    resumed = tmp_path / "resumed"
    shutil.copytree(out / name / "checkpoints", resumed / "checkpoints")
    assert (resumed / "checkpoints" / "latest").read_text().strip() == f"step_{MAX_STEPS}"
    shard = max((f for f in (resumed / "checkpoints" / f"step_{MAX_STEPS}").rglob("*") if f.is_file()),
                key=lambda f: f.stat().st_size)  # same-size corruption: only the digest check can see it
    data = bytearray(shard.read_bytes())
    data[-64:] = bytes(b ^ 0xFF for b in data[-64:])
    shard.write_bytes(bytes(data))
    accelerate_launch("fsdp2_cpu_2proc.yaml", PRETRAIN,
                      run_args(name, resumed, GLOBAL_ROWS // 2, ["--trainer.resume_from_checkpoint", "latest"]),
                      timeout_s=LAUNCH_TIMEOUT_S, run_root=tmp_path)
    good = resumed / "checkpoints" / f"step_{SAVE_STEP}"
    logs = [(resumed / "logs" / f"rank_{rank}.log").read_text() for rank in (0, 1)]
    verified = [[line for line in log.splitlines() if "INFO neobert_pt.train.checkpoint: verified checkpoint" in line]
                for log in logs]
    assert len(verified[0]) == 1 and f"verified checkpoint {good}: blake2b digests of " in verified[0][0], verified
    assert verified[1] == [], "rank 1 hashed checkpoint files; only the node's local main process should"
    fallback = f"does not match the digest recorded at save time (corrupt or modified); using the previous good " \
               f"checkpoint {good}"
    assert shard.name in logs[0] and logs[0].count(fallback) == 1 and fallback not in logs[1]
    for log in logs:
        assert f"resumed from {good} (step {SAVE_STEP})" in log
    got, ref = _train_records(resumed), _train_records(out / name)
    assert sorted(got) == list(range(SAVE_STEP + 1, MAX_STEPS + 1))
    for step, record in got.items():
        for key in ("train/loss", "train/grad_norm", "train/lr", "train/max_attention_logit"):
            assert record[key] == ref[step][key], f"step {step} {key}: {record[key]} != {ref[step][key]}"
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["resumed_from_step"] == SAVE_STEP and summary["mode"] == "fsdp2"

    from safetensors.torch import load_file

    exported = load_file(resumed / "final" / "model.safetensors")
    reference = _dump(out / name, 0)["full"]
    for key, value in exported.items():
        assert torch.equal(value, reference[key]), f"resumed final weights differ in {key}"


@pytest.mark.timeout(LAUNCH_TIMEOUT_S)
def test_resume_with_a_changed_global_batch_is_refused(ddp, tmp_path):
    """The data position is global: another world size resumes only with the same global batch (one clear line).

    A DDP checkpoint of an element-wise optimizer: the mesh check lets it resume on one process, so the refusal is
    the data position's (an FSDP2 checkpoint would be refused earlier, by its mesh).
    """
    out, _ = ddp
    ckpt = out / "adamw" / "checkpoints" / f"step_{SAVE_STEP}"
    done = run_process([sys.executable, str(PRETRAIN),
                        *run_args("adamw", tmp_path / "one", GLOBAL_ROWS // 2,
                                  ["--trainer.resume_from_checkpoint", str(ckpt)])],
                       timeout_s=LAUNCH_TIMEOUT_S, run_root=tmp_path, check=False)
    assert done.returncode != 0
    assert "the global batch was 8 rows per optimizer step in the checkpoint and is 4 now" in done.output, \
        done.output[-3000:]
    assert not (tmp_path / "one" / "metrics.jsonl").exists() or not _train_records(tmp_path / "one")


@pytest.mark.timeout(LAUNCH_TIMEOUT_S)
def test_fsdp2_export_loads_in_a_fresh_process_without_neobert_pt(fsdp):
    """``final/`` of a sharded run is a complete HF model: ``trust_remote_code`` loading, exact weights, finite logits."""
    out, _ = fsdp
    run_dir = out / "dion2"
    code = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForMaskedLM, AutoTokenizer
        final = {str(run_dir / "final")!r}
        model = AutoModelForMaskedLM.from_pretrained(final, trust_remote_code=True).eval()
        assert not any(m.startswith("neobert_pt") for m in sys.modules), "neobert_pt was imported"
        ref = torch.load({str(run_dir / "dump_rank0.pt")!r}, weights_only=False)["full"]
        state = model.state_dict()
        for key, value in ref.items():
            assert torch.equal(state[key], value), key
        assert model.lm_head.weight.data_ptr() == model.model.embeddings.weight.data_ptr(), "decoder not tied"
        batch = AutoTokenizer.from_pretrained(final)(["the quick brown fox", "a distributed run"], padding=True,
                                                     return_tensors="pt")
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()
        print("EXPORT_OK", type(model).__module__, tuple(logits.shape))
    """)
    env = child_env()
    env["PYTHONPATH"] = ""  # the loader must not be able to import the repository's package
    done = run_process([sys.executable, "-c", code], timeout_s=LAUNCH_TIMEOUT_S, run_root=run_dir, env=env)
    assert "EXPORT_OK transformers_modules" in done.output, done.output[-3000:]


@pytest.mark.timeout(60)
def test_deepspeed_accelerate_config_is_a_clear_error(monkeypatch):
    """``distributed_type: DEEPSPEED`` makes ``accelerate launch`` export ACCELERATE_USE_DEEPSPEED; we refuse it."""
    from neobert_pt.config.errors import ConfigError
    from neobert_pt.train.distributed import make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="DeepSpeed is not supported.*FSDP2"):
        make_accelerator()

