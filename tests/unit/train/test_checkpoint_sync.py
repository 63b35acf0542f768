"""Mirroring checkpoints to shared storage: only complete checkpoints move, the shared copy is always loadable."""

from __future__ import annotations

import json
from pathlib import Path

from neobert_pt.train.checkpoint import CHECKPOINTS_DIR, LATEST, MARKER, verify
from neobert_pt.train.checkpoint_sync import complete_steps, restore, sync_once


def _fake_checkpoint(run: Path, step: int, *, sealed: bool = True, payload: bytes = b"weights") -> Path:
    d = run / CHECKPOINTS_DIR / f"step_{step}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(payload * step)
    if sealed:
        files = {"model.safetensors": len(payload) * step}
        (d / MARKER).write_text(json.dumps({"step": step, "world_size": 1, "files": files}))
    return d


def test_sync_copies_only_complete_and_prunes_after_publish(tmp_path):
    local, shared = tmp_path / "local", tmp_path / "shared"
    _fake_checkpoint(local, 10)
    (local / "config.yaml").write_text("seed: 1\n")
    assert sync_once(local, shared, keep=1).name == "step_10"
    assert (shared / CHECKPOINTS_DIR / LATEST).read_text().strip() == "step_10"
    assert (shared / "config.yaml").read_text() == "seed: 1\n"

    _fake_checkpoint(local, 20, sealed=False)  # a save in progress is never mirrored
    assert sync_once(local, shared, keep=1) is None
    assert [p.name for p in complete_steps(shared)] == ["step_10"]

    (local / CHECKPOINTS_DIR / "step_20" / "model.safetensors").unlink()
    (local / CHECKPOINTS_DIR / "step_20").rmdir()
    _fake_checkpoint(local, 20)
    assert sync_once(local, shared, keep=1).name == "step_20"
    assert [p.name for p in complete_steps(shared)] == ["step_20"]  # old one removed after the new is in place
    assert verify(shared / CHECKPOINTS_DIR / "step_20") is None
    assert not list((shared / CHECKPOINTS_DIR).glob(".sync_*"))
    assert sync_once(local, shared) is None  # already there: nothing to do


def test_restore_seeds_an_empty_local_dir_from_shared(tmp_path):
    local, shared = tmp_path / "local", tmp_path / "shared"
    _fake_checkpoint(shared, 5)
    _fake_checkpoint(shared, 7)
    _fake_checkpoint(shared, 9, sealed=False)
    restored = restore(shared, local)
    assert restored.name == "step_7" and verify(restored) is None
    assert (local / CHECKPOINTS_DIR / LATEST).read_text().strip() == "step_7"
    assert restore(shared, local) is None  # local already has a checkpoint: never overwritten
