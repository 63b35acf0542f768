"""``Checkpointer.resolve_resume`` on 2 real gloo processes: only a node's local main process reads and hashes the
checkpoints, and every rank ends with the same answer — the same path, the same fallback, or the same one-line error
(never one rank raising while the other waits in a collective).

The node layout is what accelerate reports (``is_local_main_process``): one node of 2 ranks (rank 0 its local main),
or two nodes of one rank each whose node-local disks hold different checkpoints (both ranks local mains, each looking
at its own directory). The checkpoints are small hand-made folders with a real ``COMPLETE`` marker; the full trainer
resume on 2 processes is ``test_trainer_distributed.py::test_fsdp2_resume_from_sharded_checkpoint_...``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from gloo import run_on_gloo  # tests/distributed/gloo.py (the test dir is on sys.path)

from neobert_pt.train.checkpoint import LATEST, MARKER, Checkpointer, CheckpointError, file_digest

TIMEOUT_S = 150  # two spawned interpreters importing torch on a loaded 2-core machine


def _checkpoint(run_dir: Path, step: int, payload: bytes) -> Path:
    """A complete ``step_<step>`` folder (one data file, sealed with its size and digest); ``latest`` names it."""
    root = run_dir / "checkpoints"
    path = root / f"step_{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(payload)
    files = {"model.safetensors": {"size": len(payload), "blake2b": file_digest(path / "model.safetensors")}}
    meta = {"format": 2, "step": step, "world_size": 2, "id": os.urandom(8).hex(), "parent_id": None, "files": files}
    (path / MARKER).write_text(json.dumps(meta))
    (root / LATEST).write_text(f"step_{step}\n")
    return path


def _prepare(out: Path) -> None:
    shared = out / "shared"  # step_4 (latest) has same-size corruption: the answer is step_2 with a warning
    _checkpoint(shared, 2, b"a" * 4096)
    bad = _checkpoint(shared, 4, b"b" * 4096)
    (bad / "model.safetensors").write_bytes(b"c" * 4096)
    broken = out / "broken"  # the only checkpoint lost its marker: an error on every rank
    (_checkpoint(broken, 2, b"a" * 64) / MARKER).unlink()
    _checkpoint(out / "node_0", 2, b"a" * 64)  # node-local disks that differ
    _checkpoint(out / "node_1", 2, b"a" * 64)
    _checkpoint(out / "node_1", 4, b"b" * 64)


def _work(rank: int, out_dir: str) -> dict:
    out = Path(out_dir)
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(f"{record.levelname} {record.getMessage()}")

    log = logging.getLogger("neobert_pt.train.checkpoint")
    log.setLevel(logging.INFO)
    log.addHandler(Keep())

    def resolve(run_dir: Path, mode: str, *, local_main: bool) -> dict:
        acc = SimpleNamespace(num_processes=2, process_index=rank, is_local_main_process=local_main)
        ckpt = Checkpointer(acc, run_dir, save_steps=None, save_total_limit=None, max_steps=6)
        del records[:]
        try:
            found = ckpt.resolve_resume(mode)
            return {"path": None if found is None else str(found), "error": None, "logs": list(records)}
        except CheckpointError as e:
            return {"path": None, "error": str(e), "logs": list(records)}

    one_node = rank == 0
    return {
        "fallback": resolve(out / "shared", "latest", local_main=one_node),
        "explicit": resolve(out / "shared", str(out / "shared" / "checkpoints" / "step_4"), local_main=one_node),
        "broken": resolve(out / "broken", "latest", local_main=one_node),
        "fresh": resolve(out / "empty", "latest", local_main=one_node),
        "two_nodes": resolve(out / f"node_{rank}", "latest", local_main=True),
    }


@pytest.mark.distributed
@pytest.mark.timeout(TIMEOUT_S + 30)
def test_one_process_per_node_verifies_and_every_rank_gets_the_same_decision(tmp_path) -> None:
    _prepare(tmp_path)
    rank0, rank1 = run_on_gloo(_work, tmp_path, timeout_s=TIMEOUT_S, what="resume decision")
    good = str(tmp_path / "shared" / "checkpoints" / "step_2")

    # one node: rank 0 hashed step_4 (mismatch) and step_2 and warned once; rank 1 read nothing and logged nothing
    assert rank0["fallback"]["path"] == rank1["fallback"]["path"] == good
    assert any(line.startswith(f"INFO verified checkpoint {good}: blake2b digests of 1 files, 4096 bytes, ")
               for line in rank0["fallback"]["logs"]), rank0["fallback"]["logs"]
    assert any(line.startswith("WARNING") and "model.safetensors does not match the digest" in line
               and f"using the previous good checkpoint {good}" in line for line in rank0["fallback"]["logs"])
    assert rank1["fallback"]["logs"] == []

    # errors: the same line on both ranks (the explicit corrupt path names the file and the good checkpoint)
    for case, expected in (("explicit", "model.safetensors does not match the digest recorded at save time"),
                           ("broken", "no usable checkpoint")):
        assert rank0[case]["error"] == rank1[case]["error"] and expected in rank0[case]["error"], case
        assert rank0[case]["path"] is rank1[case]["path"] is None
        assert not [line for line in rank1[case]["logs"] if "verified checkpoint" in line], case
    assert f"pass --trainer.resume_from_checkpoint {good}" in rank0["explicit"]["error"]
    assert rank0["fresh"] == rank1["fresh"] == {"path": None, "error": None, "logs": []}

    # two nodes whose disks differ: each leader verified its own newest checkpoint, then both raised one line
    both = rank0["two_nodes"]["error"]
    assert both is not None and both == rank1["two_nodes"]["error"] and "\n" not in both
    assert str(tmp_path / "node_0" / "checkpoints" / "step_2") in both
    assert str(tmp_path / "node_1" / "checkpoints" / "step_4") in both
    assert both.startswith("the nodes disagree on the checkpoint to resume (rank 0 on ")
    assert "shared filesystem" in both
    for rank, result in enumerate((rank0, rank1)):
        assert any("INFO verified checkpoint" in line for line in result["two_nodes"]["logs"]), rank
