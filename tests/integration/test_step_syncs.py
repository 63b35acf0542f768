"""A non-logging training step makes exactly ONE device->host sync (the non-finite skip decision, which also
carries the loss, grad norm and token counts): counted on CPU by op, and on CUDA by torch's own sync detector.

Every op that must read device memory back to the host is counted: scalar reads (``item``, ``bool``, ``int``,
``float`` all dispatch ``aten._local_scalar_dense``), ops whose output size depends on values (``nonzero``,
``masked_select``, unique, boolean indexing), and the Python-level copies ``tolist`` / ``cpu`` / ``numpy``. The
micro-batches are drawn (and their masked positions and varlen sizes found on the host) before counting: that
host-side data work is not the device step, and on CPU it could not be told apart from device reads.
"""

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from neobert_pt.config import load_config
from neobert_pt.train import Trainer
from neobert_pt.train.trainer import with_host_metadata

SYNCING_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten._unique2",
               "aten.unique_consecutive", "aten.unique_dim", "aten.repeat_interleave"}


class SyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        if name in SYNCING_OPS:
            self.calls.append(name)
        elif name == "aten.index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                          for i in (args[1] if len(args) > 1 else ())):
            self.calls.append("aten.index (boolean mask)")
        return func(*args, **(kwargs or {}))


def step_config(tmp_path, optimizer: str, attention: str, *extra: str):
    return load_config(None, [*extra,
        "--model.hidden_size", "32", "--model.num_hidden_layers", "1", "--model.num_attention_heads", "2",
        "--model.intermediate_size", "64", "--model.attn_implementation", attention,
        "--dataset.max_seq_length", "32", "--dataset.max_documents", "30",
        "--trainer.per_device_train_batch_size", "2", "--trainer.gradient_accumulation_steps", "2",
        "--trainer.max_steps", "4", "--trainer.disable_tqdm", "true", "--optimizer.name", optimizer,
        "--trainer.output_dir", str(tmp_path / "run"), "--wandb.mode", "disabled",
    ])


def warm_up_and_queue_window(trainer: Trainer) -> None:
    """One logging step (lazy optimizer state, first-call paths), then the next accumulation window drawn on the
    host with its host metadata (loader, collator, masked positions, varlen sizes), queued for the counted step."""
    trainer.model.train()
    trainer.train_step(should_log=True)
    window = [with_host_metadata(next(trainer.train_iter), trainer.unwrapped.config)
              for _ in range(trainer.run.trainer.gradient_accumulation_steps)]
    trainer.train_iter = iter(window)


# varlen: the unpad-once stream on CPU (its reference kernel), metadata from the host-computed varlen_sizes
@pytest.mark.parametrize(("optimizer", "attention"), [("adamw", "sdpa"), ("dana-star-mk4", "sdpa"),
                                                      ("adamw", "varlen")])
def test_non_logging_step_has_one_host_sync(tmp_path, monkeypatch, optimizer, attention):
    cfg = step_config(tmp_path, optimizer, attention)
    trainer = Trainer(cfg)
    try:
        warm_up_and_queue_window(trainer)
        copies: list[str] = []
        for method in ("tolist", "cpu", "numpy"):
            original = getattr(torch.Tensor, method)

            def counted(self, *args, _name=method, _original=original, **kwargs):
                copies.append(_name)
                return _original(self, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, method, counted)
        with SyncCounter() as counter:
            metrics = trainer.train_step(should_log=False)
        monkeypatch.undo()
        assert copies == ["tolist"] and counter.calls == [], (copies, counter.calls)
        assert metrics["train/tokens"] > 0 and metrics["train/masked_tokens"] > 0
        assert isinstance(metrics["train/loss"], float) and isinstance(metrics["train/grad_norm"], float)
    finally:
        trainer.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.set_sync_debug_mode)")
@pytest.mark.parametrize("optimizer", ["adamw", "dana-star-mk4"])
def test_cuda_non_logging_step_has_one_host_sync(tmp_path, optimizer):
    """On CUDA, torch's own detector reports every synchronizing CUDA call of the step (copies to the host, scalar
    reads, synchronize). It runs in mode "warn" and the reports are counted: mode "error" would abort the step at its
    one designed read (the ``tolist`` of the skip decision), so "exactly one report" is the sharper check."""
    # bf16 and 'auto': the fastest exact backend on this GPU (varlen/flash-attn where available, else flex_attention)
    cfg = step_config(tmp_path, optimizer, "auto", "--trainer.mixed_precision", "bf16")
    trainer = Trainer(cfg)
    try:
        assert trainer.accelerator.device.type == "cuda"
        warm_up_and_queue_window(trainer)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                metrics = trainer.train_step(should_log=False)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message) for w in caught if "synchronizing CUDA operation" in str(w.message)]
        assert len(syncs) == 1, syncs
        assert metrics["train/tokens"] > 0 and isinstance(metrics["train/loss"], float)
    finally:
        trainer.close()


def test_tflops_and_mfu_reach_metrics_and_summary(tmp_path):
    """train/tflops on every logging step; train/mfu with trainer.peak_tflops (a CPU has no table entry)."""
    from neobert_pt.train.summary import read_metrics

    out = tmp_path / "run"
    cfg = load_config(None, [
        "--model.hidden_size", "32", "--model.num_hidden_layers", "1", "--model.num_attention_heads", "2",
        "--model.intermediate_size", "64", "--dataset.max_seq_length", "32", "--dataset.max_documents", "30",
        "--trainer.per_device_train_batch_size", "2", "--trainer.max_steps", "3", "--trainer.logging_steps", "1",
        "--trainer.eval_steps", "null", "--trainer.save_steps", "null", "--trainer.save_final_model", "false",
        "--trainer.disable_tqdm", "true", "--trainer.peak_tflops", "0.5", "--trainer.output_dir", str(out),
        "--wandb.mode", "disabled",
    ])
    trainer = Trainer(cfg)
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    train = [r for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]
    assert len(train) == 3 and all(r["train/tflops"] > 0 for r in train)
    assert all(r["train/mfu"] == pytest.approx(r["train/tflops"] / 0.5) for r in train)
    assert summary["tflops_per_device"] > 0 and summary["mfu"] > 0
