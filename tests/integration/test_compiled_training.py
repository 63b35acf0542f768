"""trainer.torch_compile: per-block torch.compile trains like eager within a stated tolerance and does not recompile
after the first step (torch.compiler.set_stance("fail_on_recompile") turns any recompile into an error).

Slow: inductor compiles one block's forward and backward on the CPU (tens of seconds on 2 cores)."""

import pytest
import torch

from neobert_pt.config import load_config
from neobert_pt.train import Trainer

pytestmark = pytest.mark.slow

ARGS = [
    "--model.hidden_size", "32", "--model.num_hidden_layers", "2", "--model.num_attention_heads", "2",
    "--model.intermediate_size", "64", "--dataset.max_seq_length", "32", "--dataset.max_documents", "30",
    "--trainer.per_device_train_batch_size", "2", "--trainer.gradient_accumulation_steps", "1",
    "--trainer.max_steps", "5", "--trainer.disable_tqdm", "true", "--wandb.mode", "disabled", "--seed", "5",
]
# fp32 on CPU: inductor reorders and fuses reductions (RMSNorm, softmax), so losses agree to rounding, not bits
LOSS_RTOL = 1e-4


def losses(tmp_path, name: str, compiled: bool, *, fail_on_recompile_after: int | None = None) -> list[float]:
    cfg = load_config(None, [*ARGS, "--trainer.output_dir", str(tmp_path / name),
                             "--trainer.torch_compile", str(compiled).lower()])
    trainer = Trainer(cfg)
    out = []
    try:
        trainer.model.train()
        for step in range(4):
            if fail_on_recompile_after is not None and step == fail_on_recompile_after:
                torch.compiler.set_stance("fail_on_recompile")
            out.append(trainer.train_step(should_log=step % 2 == 0)["train/loss"])
    finally:
        torch.compiler.set_stance("default")
        trainer.close()
    return out


def test_compiled_blocks_match_eager_and_do_not_recompile(tmp_path):
    torch._dynamo.reset()
    eager = losses(tmp_path, "eager", False)
    compiled = losses(tmp_path, "compiled", True, fail_on_recompile_after=1)
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=LOSS_RTOL, atol=0)


def test_compiled_run_resumes_bit_exactly_from_its_own_checkpoint(tmp_path, monkeypatch):
    def run(out, *extra):
        cfg = load_config(None, [*ARGS, "--trainer.output_dir", str(out), "--trainer.torch_compile", "true",
                                 "--trainer.save_steps", "2", "--trainer.max_steps", "4", "--trainer.logging_steps", "1",
                                 "--trainer.eval_steps", "null", "--trainer.save_final_model", "false", *extra])
        trainer = Trainer(cfg)
        try:
            trainer.fit()
            return trainer, {k: v.detach().clone() for k, v in trainer.unwrapped.state_dict().items()}
        finally:
            trainer.close()

    _, reference = run(tmp_path / "ref")
    original = Trainer.train_step

    def killed_after_step_3(self, should_log):
        if self.state.step == 3:
            raise KeyboardInterrupt("simulated kill")
        return original(self, should_log)

    monkeypatch.setattr(Trainer, "train_step", killed_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut")  # checkpoint at step 2, step 3 done and lost
    monkeypatch.setattr(Trainer, "train_step", original)
    trainer, resumed = run(tmp_path / "cut", "--trainer.resume_from_checkpoint", "latest")
    assert trainer.resumed_from_step == 2
    for k, v in reference.items():
        assert torch.equal(resumed[k], v), k
