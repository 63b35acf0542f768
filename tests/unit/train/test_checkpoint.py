"""Checkpointer contract on a real single-process Accelerator: atomic layout, verification, fallback, retention,
resume-mode resolution and overwrite refusal."""

import errno
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from neobert_pt.train import checkpoint
from neobert_pt.train.checkpoint import (
    LATEST,
    MARKER,
    Checkpointer,
    CheckpointError,
    CheckpointSaveError,
    UnsafeCheckpointError,
    capture_rng,
    check_writable,
    merge_resume_decisions,
    restore_rng,
    verify,
)


class Counter:
    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, s):
        self.n = s["n"]


@pytest.fixture
def setup(tmp_path):
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    counter = Counter()
    ckpt = Checkpointer(acc, tmp_path, save_steps=2, save_total_limit=2, max_steps=7)
    return acc, model, opt, counter, ckpt


def _train(model, opt, counter):
    model(torch.randn(2, 4)).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()
    counter.n += 1


def _save(ckpt, step, extra=None, counter=None):
    return ckpt.save(step, rank_state={"data": {"pos": step, **(extra or {})}},
                     trainer_state={"n": counter.n if counter else 0},
                     write_config=lambda p: p.write_text("seed: 0\n"))


def test_save_layout_and_roundtrip(setup):
    acc, model, opt, counter, ckpt = setup
    _train(model, opt, counter)
    path = _save(ckpt, 2, counter=counter)
    assert path.name == "step_2" and verify(path, deep=True) is None
    meta = json.loads((path / MARKER).read_text())
    assert meta["step"] == 2 and meta["world_size"] == 1 and "rank_state_0.json" in meta["files"]
    assert set(meta["files"]["model.safetensors"]) == {"size", "blake2b"}
    assert not [f for f in meta["files"] if f.endswith(".pkl")]  # nothing that would need unpickling
    assert (ckpt.root / LATEST).read_text().strip() == "step_2"
    assert not list(ckpt.root.glob(".tmp_*"))
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, opt, counter)
    assert counter.n == 2
    restored = ckpt.load(path)
    assert restored.rank_state == {"data": {"pos": 2}} and restored.trainer_state == {"step": 2, "n": 1}
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k])


def test_should_save_interval_and_final(setup):
    *_, ckpt = setup
    assert [s for s in range(1, 8) if ckpt.should_save(s)] == [2, 4, 6, 7]


def test_retention_keeps_newest_complete(setup):
    acc, model, opt, counter, ckpt = setup
    for step in (2, 4, 6):
        _save(ckpt, step)
    assert [p.name for p in ckpt.step_dirs()] == ["step_4", "step_6"]


def test_incomplete_and_corrupt_checkpoints_fall_back(setup, caplog):
    acc, model, opt, counter, ckpt = setup
    _save(ckpt, 2)
    good = _save(ckpt, 4)
    bad = ckpt.root / "step_6"  # a save killed before its marker was written, pointer already moved
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"xx")
    (ckpt.root / LATEST).write_text("step_6\n")
    assert "no COMPLETE marker" in verify(bad)
    with caplog.at_level("WARNING"):
        assert ckpt.resolve_resume("latest") == good
    assert "not usable" in caplog.text and "step_4" in caplog.text
    # truncate a file of the good checkpoint: detected through the sizes in the marker
    f = good / "model.safetensors"
    f.write_bytes(f.read_bytes()[:10])
    assert "corrupt" in verify(good)
    assert ckpt.resolve_resume("true").name == "step_2"
    with pytest.raises(CheckpointError, match="newest good checkpoint is .*step_2"):
        ckpt.resolve_resume(str(good))


def test_resume_modes(setup, tmp_path):
    *_, ckpt = setup
    assert ckpt.resolve_resume("latest") is None  # nothing yet: a fresh start
    first = _save(ckpt, 2)
    for mode in (None, False, "false", "null"):
        assert ckpt.resolve_resume(mode) is None
    for mode in ("latest", "true", True, str(first), str(tmp_path)):
        assert ckpt.resolve_resume(mode) == first
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.resolve_resume(str(tmp_path / "nope"))


def test_other_world_size_resumes_from_rank_0_state(setup):
    """The data position is global: a checkpoint of another world size loads and hands back rank 0's state."""
    acc, model, opt, counter, ckpt = setup
    path = _save(ckpt, 2)
    meta = json.loads((path / MARKER).read_text())
    meta["world_size"] = 2
    (path / MARKER).write_text(json.dumps(meta))
    assert ckpt.load(path).rank_state["data"]["pos"] == 2


def test_output_dir_of_another_run_is_refused_unless_overwrite(setup):
    acc, model, opt, counter, ckpt = setup
    _save(ckpt, 2)
    (ckpt.root / ".tmp_step_4").mkdir()
    with pytest.raises(CheckpointError, match="overwrite_output_dir"):
        ckpt.check_output_dir(resuming=False, overwrite=False)
    ckpt.check_output_dir(resuming=True, overwrite=False)  # continuing is fine; stale temp dirs are cleaned
    assert not (ckpt.root / ".tmp_step_4").exists() and ckpt.complete()
    ckpt.check_output_dir(resuming=False, overwrite=True)
    assert ckpt.step_dirs() == []


# ---- safety: loading a checkpoint never runs code ----------------------------------------------------------------
class Evil:
    """Unpickling this creates ``self.marker`` (what a malicious checkpoint file would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _reseal(path):
    """An attacker who also rewrites the marker: sizes and digests match the tampered files."""
    from neobert_pt.train.checkpoint import file_digest

    meta = json.loads((path / MARKER).read_text())
    meta["files"] = {str(f.relative_to(path)): {"size": f.stat().st_size, "blake2b": file_digest(f)}
                     for f in sorted(path.rglob("*")) if f.is_file() and f.name != MARKER}
    (path / MARKER).write_text(json.dumps(meta))


def _plant(target, marker):
    if target.suffix in (".bin", ".pt"):
        torch.save(Evil(marker), target)  # a real torch zip archive whose data.pkl runs code
    else:
        target.write_bytes(pickle.dumps(Evil(marker)))


def test_malicious_pickle_in_any_checkpoint_file_is_refused_and_never_runs(setup, tmp_path):
    acc, model, opt, counter, ckpt = setup
    good = _save(ckpt, 2, counter=counter)
    marker = tmp_path / "PWNED"
    names = sorted(str(f.relative_to(good)) for f in good.rglob("*") if f.is_file())
    assert {"COMPLETE", "model.safetensors", "optimizer.bin", "rank_state_0.json", "trainer_state.json",
            "config.yaml"} <= set(names)
    for name in [*names, "custom_checkpoint_0.pkl", "random_states_0.pkl"]:
        victim = tmp_path / f"copy_{name}"
        shutil.copytree(good, victim)
        _plant(victim / name, marker)
        if name != MARKER:
            _reseal(victim)
        with pytest.raises(CheckpointError) as err:
            if verify(victim, deep=True) is not None:
                raise CheckpointError(verify(victim, deep=True))
            ckpt.load(victim)
        assert name in str(err.value), (name, str(err.value))
        assert not marker.exists(), name
    everything = tmp_path / "all"
    shutil.copytree(good, everything)
    for f in everything.rglob("*"):
        if f.is_file() and f.name != MARKER:
            _plant(f, marker)
    _reseal(everything)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load checkpoint file"):
        ckpt.load(everything)
    assert not marker.exists()


# ---- integrity: same-size corruption falls back, naming the file -------------------------------------------------
@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.bin", "header"])
def test_same_size_corruption_falls_back_with_a_warning_naming_the_file(setup, caplog, victim):
    acc, model, opt, counter, ckpt = setup
    _save(ckpt, 2)
    bad = _save(ckpt, 4)
    f = bad / ("model.safetensors" if victim == "header" else victim)
    data = bytearray(f.read_bytes())
    if victim == "header":
        data[8:40] = b"{" * 32  # scribble over the safetensors JSON header
    elif victim == "optimizer.bin":
        data[:] = bytes(len(data))  # zeroed
    else:
        data[-64:] = os.urandom(64)  # random bytes inside the weights
    f.write_bytes(bytes(data))
    assert verify(bad) is None  # sizes still match
    with caplog.at_level("WARNING"):
        assert ckpt.resolve_resume("latest").name == "step_2"
    assert f.name in caplog.text and "previous good checkpoint" in caplog.text
    with pytest.raises(CheckpointError, match=f"{f.name} does not match the digest"):
        ckpt.resolve_resume(str(bad))


# ---- timelines ---------------------------------------------------------------------------------------------------
def test_latest_follows_the_pointer_after_a_rewind(setup, caplog):
    acc, model, opt, counter, ckpt = setup
    ckpt.save_total_limit = None
    first = _save(ckpt, 2)
    _save(ckpt, 4)
    _save(ckpt, 6)
    ckpt.load(first)  # rewind: resume from step 2 and save a new step 4
    new4 = _save(ckpt, 4)
    assert (ckpt.root / "step_6").is_dir()
    with caplog.at_level("WARNING"):
        assert ckpt.resolve_resume("latest") == new4
    assert "ignoring step_6" in caplog.text


def test_a_save_killed_before_the_pointer_moved_is_still_found(setup):
    acc, model, opt, counter, ckpt = setup
    _save(ckpt, 2)
    newer = _save(ckpt, 4)
    (ckpt.root / LATEST).write_text("step_2\n")  # killed between the rename and the pointer update
    assert ckpt.resolve_resume("latest") == newer


def test_latest_with_only_incomplete_checkpoints_is_an_error(setup):
    acc, model, opt, counter, ckpt = setup
    path = _save(ckpt, 2)
    (path / MARKER).unlink()
    with pytest.raises(CheckpointError, match="no usable checkpoint .* step_2"):
        ckpt.resolve_resume("latest")


# ---- one resume decision for every rank (the 2-process runs are in tests/distributed/test_resume_decision.py) ----
def test_a_deep_verification_logs_the_checkpoint_files_bytes_and_seconds(setup, caplog):
    acc, model, opt, counter, ckpt = setup
    path = _save(ckpt, 2)
    files = json.loads((path / MARKER).read_text())["files"]
    with caplog.at_level("INFO", logger="neobert_pt.train.checkpoint"):
        assert ckpt.resolve_resume("latest") == path
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("verified checkpoint")]
    assert lines == [f"verified checkpoint {path}: blake2b digests of {len(files)} files, "
                     f"{sum(e['size'] for e in files.values())} bytes, " + lines[0].rsplit(", ", 1)[1]]
    assert lines[0].endswith(" s")
    caplog.clear()
    with caplog.at_level("INFO", logger="neobert_pt.train.checkpoint"):
        assert verify(path) is None  # the cheap check reads no file content and logs nothing
    assert not caplog.records


def _leader(rank, host, path=None, error=None):
    return {"rank": rank, "host": host, "path": path, "error": error}


def test_merge_resume_decisions_agreement():
    """Ranks that are not a node's local main contribute None; agreeing node leaders give their answer."""
    assert merge_resume_decisions([_leader(0, "a", "/run/checkpoints/step_4"), None, None, None]) == \
        Path("/run/checkpoints/step_4")
    assert merge_resume_decisions([_leader(0, "a", "/r/step_4"), None, _leader(2, "b", "/r/step_4"), None]) == \
        Path("/r/step_4")
    assert merge_resume_decisions([_leader(0, "a"), None, _leader(2, "b")]) is None  # fresh start everywhere


def test_merge_resume_decisions_error_is_the_same_line_everywhere():
    line = "cannot resume: /r/step_4/model.safetensors does not match the digest recorded at save time"
    for decisions in ([_leader(0, "a", error=line), None], [_leader(0, "a", error=line), _leader(1, "b", error=line)]):
        with pytest.raises(CheckpointError) as info:
            merge_resume_decisions(decisions)
        assert str(info.value) == line
    with pytest.raises(CheckpointError, match="no local main process answered"):
        merge_resume_decisions([None, None])


@pytest.mark.parametrize("other, shown", [
    ({"path": "/r/checkpoints/step_2"}, "/r/checkpoints/step_2"),
    ({}, "no checkpoint (fresh start)"),
    ({"error": "cannot resume: /r/step_4 does not exist"}, "error 'cannot resume: /r/step_4 does not exist'"),
])
def test_merge_resume_decisions_disagreeing_nodes_name_both_answers(other, shown):
    decisions = [_leader(0, "node-a", "/r/checkpoints/step_4"), None, _leader(2, "node-b", **other), None]
    with pytest.raises(CheckpointError) as info:
        merge_resume_decisions(decisions)
    line = str(info.value)
    assert "\n" not in line
    assert line.startswith("the nodes disagree on the checkpoint to resume (rank 0 on node-a: /r/checkpoints/step_4; "
                           f"rank 2 on node-b: {shown}); ")
    assert "shared filesystem" in line and "checkpoint_sync restore" in line


def test_a_single_process_resolves_without_a_process_group(setup):
    import torch.distributed as dist

    acc, model, opt, counter, ckpt = setup
    path = _save(ckpt, 2)
    assert not (dist.is_available() and dist.is_initialized())
    assert acc.num_processes == 1 and ckpt.resolve_resume("latest") == path


# ---- storage -----------------------------------------------------------------------------------------------------
def test_a_failed_save_is_one_line_and_latest_stays(setup, monkeypatch):
    acc, model, opt, counter, ckpt = setup
    _save(ckpt, 2)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_json", full)
    with pytest.raises(CheckpointSaveError) as err:
        _save(ckpt, 4)
    msg = str(err.value)
    assert "\n" not in msg and "step_4" in msg and "no space left" in msg and "still points at step_2" in msg
    assert (ckpt.root / LATEST).read_text().strip() == "step_2" and not list(ckpt.root.glob(".tmp_*"))
    monkeypatch.setattr(acc, "save_state", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("basic_ios::clear: iostream error")))
    with pytest.raises(CheckpointSaveError, match="still points at step_2"):
        _save(ckpt, 4)
    assert verify(ckpt.root / "step_2", deep=True) is None


def test_output_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "run").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        check_writable(tmp_path / "run")
    check_writable(tmp_path / "ok" / "checkpoints")
    assert (tmp_path / "ok" / "checkpoints").is_dir() and not list((tmp_path / "ok" / "checkpoints").iterdir())


def test_rng_states_roundtrip_as_json():
    import random

    import numpy as np

    state = json.loads(json.dumps(capture_rng()))
    expected = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng(state)
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(3), expected[2])
