"""Checkpointer contract on a real single-process Accelerator: atomic layout, verification, fallback, retention,
resume-mode resolution and overwrite refusal."""

import json

import pytest
import torch
from accelerate import Accelerator

from neobert_pt.train.checkpoint import LATEST, MARKER, Checkpointer, CheckpointError, verify


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
    acc.register_for_checkpointing(counter)
    ckpt = Checkpointer(acc, tmp_path, save_steps=2, save_total_limit=2, max_steps=7)
    return acc, model, opt, counter, ckpt


def _train(model, opt, counter):
    model(torch.randn(2, 4)).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()
    counter.n += 1


def _save(ckpt, step, extra=None):
    return ckpt.save(step, rank_state={"data": {"pos": step, **(extra or {})}},
                     write_config=lambda p: p.write_text("seed: 0\n"))


def test_save_layout_and_roundtrip(setup):
    acc, model, opt, counter, ckpt = setup
    _train(model, opt, counter)
    path = _save(ckpt, 2)
    assert path.name == "step_2" and verify(path) is None
    meta = json.loads((path / MARKER).read_text())
    assert meta["step"] == 2 and meta["world_size"] == 1 and "rank_state_0.pt" in meta["files"]
    assert (ckpt.root / LATEST).read_text().strip() == "step_2"
    assert not list(ckpt.root.glob(".tmp_*"))
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, opt, counter)
    assert counter.n == 2
    rank_state = ckpt.load(path)
    assert rank_state == {"data": {"pos": 2}} and counter.n == 1
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
    with pytest.raises(CheckpointError, match="newest complete checkpoint is .*step_2"):
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


def test_world_size_mismatch_is_refused(setup):
    acc, model, opt, counter, ckpt = setup
    path = _save(ckpt, 2)
    meta = json.loads((path / MARKER).read_text())
    meta["world_size"] = 2
    (path / MARKER).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="written by 2 processes"):
        ckpt.load(path)


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
