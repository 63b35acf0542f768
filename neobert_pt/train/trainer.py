"""The training loop: wires tested components together and runs the step (docs/architecture.md).

Build order (``Trainer.__init__``): seed → accelerator → run directory / resume decision → tokenizer and data for
this rank → model → wrap (``distributed.py``) → resolve ``optimizer.lr: auto`` → optimizer (after wrapping, with the
mesh / process group) → scheduler → checkpointer → resume. ``fit()`` sequences step → log → eval → checkpoint and
ends with the final model, the summary files and a printed table.

Collectives: every all-reduce, eval forward, QK-clip reduction and checkpoint save is entered by every rank; only
writing (console, metrics.jsonl, W&B, summary, final model files) is limited to the main process.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

from neobert_pt.config import config_to_dict, save_config
from neobert_pt.config.errors import ConfigError
from neobert_pt.config.schema import RunConfig
from neobert_pt.optim.registry import OptimizerContext, build_optimizer
from neobert_pt.train import distributed, resume, signals
from neobert_pt.train import phases as phase_rules
from neobert_pt.train.budget import resolve_auto
from neobert_pt.train.checkpoint import Checkpointer, check_writable
from neobert_pt.train.flops import mfu, peak_tflops_for, throughput_flops
from neobert_pt.train.metrics import METRICS_FILE, build_metric_logger, peak_memory_mb
from neobert_pt.train.scheduler import build_scheduler, effective_warmup
from neobert_pt.train.summary import build_summary, read_metrics, summary_table, write_summary

logger = logging.getLogger("neobert_pt.train")

FINAL_DIR = "final"
LOGS_DIR = "logs"
CONFIG_FILE = "config.yaml"


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite steps; the last good state was checkpointed."""


class TrainState:
    """Trainer counters saved in every checkpoint as ``trainer_state.json`` (plain JSON values)."""

    def __init__(self) -> None:
        self.step = 0  # optimizer steps done (skipped non-finite steps included: they consumed their data)
        self.tokens_seen = 0  # global non-pad input tokens
        self.nonfinite_skipped = 0
        self.wandb_run_id: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in vars(self):  # only known counters; anything else in the file is ignored
            if key in state:
                setattr(self, key, state[key])


def _setup_logging(output_dir: Path, rank: int, is_main: bool) -> list[logging.Handler]:
    """Rank 0 logs to the console; every rank logs everything to ``logs/rank_<r>.log`` (kept for failures)."""
    (output_dir / LOGS_DIR).mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    file_handler = logging.FileHandler(output_dir / LOGS_DIR / f"rank_{rank}.log")
    file_handler.setFormatter(fmt)
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    console.setLevel(logging.INFO if is_main else logging.ERROR)
    root = logging.getLogger("neobert_pt")
    root.setLevel(logging.INFO)
    root.addHandler(file_handler)
    root.addHandler(console)
    return [file_handler, console]


def _close_on_failure(init: Any) -> Any:
    """A constructor that fails (bad data, checkpoint, ...) releases what it set up: log handlers, W&B, the
    process group. Without this an in-process caller keeps the handlers of a trainer that never existed."""

    @functools.wraps(init)
    def wrapper(self: Trainer, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except BaseException:
            self.close()
            raise

    return wrapper


def with_host_metadata(batch: dict[str, Any], config: Any) -> dict[str, Any]:
    """Add what the model would otherwise read back from the device, computed on the HOST while the batch is still
    there: ``masked_positions`` (flat indices of the labelled tokens, for the masked-logits path) and, for the
    varlen backends (``flash_attention_2``, ``varlen``), ``varlen_sizes`` (real tokens, documents, longest document)
    from the collator's ``document_ids``. A no-op for keys already present or a batch that already lives on an
    accelerator."""
    from neobert_pt.modeling.modeling_neobert import VARLEN_IMPLEMENTATIONS, varlen_sizes

    if batch["labels"].device.type != "cpu":
        return batch
    batch = dict(batch)
    if config.masked_logits_only and "masked_positions" not in batch:
        batch["masked_positions"] = batch["labels"].flatten().ne(-100).nonzero().squeeze(-1)
    varlen = config._attn_implementation in VARLEN_IMPLEMENTATIONS
    if varlen and "document_ids" in batch and "varlen_sizes" not in batch:
        batch["varlen_sizes"] = varlen_sizes(batch["document_ids"])
    return batch


def compile_blocks(model: Any) -> None:
    """``torch.compile`` every encoder block in place (``nn.Module.compile``: parameter names, state dicts and
    checkpoints stay exactly as without it). Blocks see fixed shapes (packed rows of ``max_seq_length``), so after
    the first step nothing recompiles; the embedding, the masked-positions decoder and the loss stay eager (their
    shapes change with the number of masked tokens)."""
    layers = model.model.layers
    for layer in layers:
        layer.compile()
    logger.info("torch.compile: %d encoder blocks compiled one by one (first step compiles)", len(layers))


class Trainer:
    """Pretrains NeoBERT with masked language modelling as configured by ``run``.

    Usage: ``summary = Trainer(run).fit()`` then ``close()`` (also on the exception path).
    """

    @_close_on_failure
    def __init__(self, run: RunConfig, *, accelerator: Any = None) -> None:
        from neobert_pt.data import build_data, build_tokenizer
        from neobert_pt.modeling import NeoBERTForMaskedLM
        from neobert_pt.modeling.configuration_neobert import resolve_attn_implementation

        self.run = run
        tcfg = run.trainer
        self.output_dir = Path(tcfg.output_dir)
        set_seed(run.seed)  # python, numpy, torch: model init and everything else start from the seed
        self._owns_accelerator = accelerator is None
        self.accelerator = acc = accelerator or distributed.make_accelerator(tcfg.mixed_precision,
                                                                                tcfg.distributed_timeout_s)
        check_writable(self.output_dir)  # a file, read-only or full: one line now, not at the first save
        self._handlers = _setup_logging(self.output_dir, acc.process_index, acc.is_main_process)
        self.metrics: Any = None
        self.exit_code = 0  # neobert_pt.cli.EXIT_INTERRUPTED after a signal-triggered save
        # `auto` numbers (max_steps, lr) become numbers before anything is written; config.yaml records them.
        self.resolved = resolve_auto(run, acc.num_processes)
        self.max_steps = tcfg.max_steps
        self.plan = phase_rules.build_plan(run, acc.num_processes, self.max_steps)  # [] without phases
        self.data_phase = 0  # the phase the train loader was built for
        self.accumulation = tcfg.gradient_accumulation_steps  # micro-batches of the next step
        self.status = "completed"
        self._stop = signals.StopOnSignal()

        # Decide fresh start vs resume before anything is written into the run directory.
        self.checkpointer = Checkpointer(acc, self.output_dir, save_steps=tcfg.save_steps,
                                         save_total_limit=tcfg.save_total_limit, max_steps=self.max_steps)
        self.resume_path = self.checkpointer.resolve_resume(tcfg.resume_from_checkpoint)
        wants_resume = str(tcfg.resume_from_checkpoint).lower() in ("latest", "true")
        self.checkpointer.check_output_dir(resuming=self.resume_path is not None or wants_resume,
                                           overwrite=tcfg.overwrite_output_dir)
        if acc.is_main_process:
            save_config(run, self.output_dir / CONFIG_FILE)

        self._pin_memory = acc.device.type == "cuda" and tcfg.dataloader_pin_memory  # for async host-to-device
        with acc.main_process_first():  # rank 0 fills the tokenization cache, the others read it
            self.tokenizer = build_tokenizer(run)
            self.data = build_data(self._phase_run(0), self.tokenizer, rank=acc.process_index,
                                   world_size=acc.num_processes, pin_memory=self._pin_memory)
        logger.info(self.data.describe())
        self.train_iter = iter(self.data.train)

        vocab = run.model.vocab_size or len(self.tokenizer)
        if vocab < len(self.tokenizer):
            raise ConfigError(f"model.vocab_size={vocab} is smaller than the tokenizer ({len(self.tokenizer)} tokens); "
                              "set it >= that or null")
        resolved: dict[str, Any] = {"pad_token_id": self.tokenizer.pad_token_id}
        if run.model.attn_implementation == "auto":  # resolved here, where the precision is known
            resolved["attn_implementation"] = resolve_attn_implementation(
                "auto", half_precision=acc.mixed_precision == "bf16")
        model = NeoBERTForMaskedLM(run.model.neobert_config(vocab_size=vocab, **resolved))
        if tcfg.activation_checkpointing:
            model.enable_activation_checkpointing()
        if tcfg.torch_compile:  # torchtitan's order: activation checkpointing -> compile -> DDP/FSDP2 wrap
            compile_blocks(model)
        self.num_params = sum(p.numel() for p in model.parameters())
        self._model_cls = type(model)
        self._optimizer_syncs_replicas = distributed.optimizer_syncs_replicas(acc, run.optimizer)
        self.model, mesh = distributed.wrap_model(acc, model, optimizer_syncs_replicas=self._optimizer_syncs_replicas)
        replicate_mesh, shard_mesh = distributed.hsdp_meshes(acc)
        self._replicate_group = replicate_mesh.get_group() if replicate_mesh is not None else None
        self.unwrapped = acc.unwrap_model(self.model)

        built = build_optimizer(OptimizerContext(model=self.unwrapped, config=run.optimizer,
                                                 max_steps=self.max_steps, distributed_mesh=mesh,
                                                 replicate_mesh=replicate_mesh, shard_mesh=shard_mesh))
        self.qk_clip = built.qk_clip
        self._raw_optimizer = built.optimizer
        self.optimizer = distributed.prepare_optimizer(acc, built.optimizer)
        self.checkpointer.sharded = distributed.sharded_checkpoint(acc, self.model, built.optimizer)
        self.scheduler = build_scheduler(built.optimizer, run.scheduler, self.max_steps, plan=self.plan)
        self.state = TrainState()  # saved as JSON by the checkpointer, never registered as a pickled object

        self.resumed_from_step: int | None = None
        self._consecutive_nonfinite = 0
        if self.resume_path is not None:
            distributed.check_resume_mesh(acc, self.resume_path, run.optimizer.name)
            self._resume(self.resume_path)

        self.metrics = build_metric_logger(
            acc.is_main_process, output_dir=self.output_dir, max_steps=self.max_steps, start_step=self.state.step,
            resume_step=self.resumed_from_step, wandb_cfg=run.wandb, wandb_run_id=self.state.wandb_run_id,
            config=config_to_dict(run), disable_tqdm=tcfg.disable_tqdm,
        )
        if acc.is_main_process:
            self.state.wandb_run_id = self.metrics.wandb_run_id
        self.peak_tflops = tcfg.peak_tflops or peak_tflops_for(self._device_name())
        self._log_startup(built.log_lines)

    # ---- phases (docs/phases.md; a no-op without `phases`) ------------------------------------------------------
    def _phase_run(self, index: int) -> RunConfig:
        return phase_rules.phase_run(self.run, self.plan[index]) if self.plan else self.run

    def _enter_data_phase(self, index: int, *, carry_position: bool) -> None:
        """Rebuild the train loader / eval batches for phase ``index`` (re-packed at its sequence length).

        With ``carry_position`` the new loader continues at the old one's token offset into the epoch
        (:func:`phase_rules.continue_position`); on resume the saved position is loaded afterwards instead.
        """
        from neobert_pt.data import build_data

        acc, old, old_seq = self.accelerator, self.data.train.state_dict(), self.data.tokens_per_row
        with acc.main_process_first():
            self.data.train.close()
            self.data = build_data(self._phase_run(index), self.tokenizer, rank=acc.process_index,
                                   world_size=acc.num_processes, pin_memory=self._pin_memory)
        if carry_position:
            self.data.train.load_state_dict(phase_rules.continue_position(
                old, old_seq, self.data.train.state_dict(), self.data.tokens_per_row))
        self.train_iter = iter(self.data.train)
        self.data_phase = index
        logger.info("phase %s: data re-built with %d-token rows, %d rows per device", self.plan[index].name,
                    self.data.tokens_per_row, self.plan[index].per_device_train_batch_size)

    def _sync_phase(self) -> None:
        """Apply the settings of the next update's phase: data, RoPE base, masking rate, accumulation."""
        if not self.plan:
            return
        step = self.state.step
        phase = phase_rules.phase_at(self.plan, step)
        if phase.index != self.data_phase:
            loader = self.plan[self.data_phase]
            if (phase.max_seq_length, phase.per_device_train_batch_size) != (
                    loader.max_seq_length, loader.per_device_train_batch_size):
                self._enter_data_phase(phase.index, carry_position=True)
            else:  # same rows and batch: the loader carries on untouched (no re-read of a stream)
                self.data_phase = phase.index
        if self.unwrapped.config.rope_theta != phase.rope_theta:
            from neobert_pt.modeling.modeling_neobert import rope_inv_freq

            self.unwrapped.config.rope_theta = phase.rope_theta  # saved with the final model as well
            inv_freq = self.unwrapped.model.rotary_emb.inv_freq
            inv_freq.copy_(rope_inv_freq(self.unwrapped.config, inv_freq.device))
            logger.info("phase %s: rope_theta %g from step %d", phase.name, phase.rope_theta, step + 1)
        self.data.train.set_mlm_probability(phase_rules.mlm_probability_at(phase, step))
        self.accumulation = phase_rules.accumulation_at(phase, step)

    def _phase_metrics(self) -> dict[str, float]:
        """What the step just taken ran with (logged every logging step)."""
        rows = self.data.train.batch_size * self.accumulation * self.accelerator.num_processes
        return {"train/mlm_probability": self.data.train.collator.mlm_probability,
                "train/seq_len": self.data.tokens_per_row, "train/batch_tokens": rows * self.data.tokens_per_row,
                "train/phase": self.data_phase}

    def _phase_state(self) -> dict[str, Any]:
        if not self.plan:
            return {"data_phase": 0}
        phase = phase_rules.phase_at(self.plan, max(0, self.state.step - 1))  # the phase of the last update
        return {"data_phase": self.data_phase, "name": phase.name, "index": phase.index,
                "steps_into_phase": self.state.step - phase.start}

    # ---- set-up helpers ---------------------------------------------------------------------------------------
    def _resume(self, path: Path) -> None:
        """Checkpoint state under the current config (resume.py): hyperparameters and schedule stay as configured."""
        early = self.checkpointer.rank_state(path)
        if early.get("phase", {}).get("data_phase", 0) == self.data_phase:
            self.data.train.load_state_dict(early["data"])  # a changed global batch is refused before any loading
        restored = resume.restore(self.checkpointer, path, run=self.run, model=self.unwrapped,
                                  optimizer=self.optimizer, scheduler=self.scheduler)
        self.state.load_state_dict(restored.trainer_state)
        saved = restored.rank_state.get("phase", {})
        if saved.get("data_phase", 0) != self.data_phase:  # rebuild the loader the position was saved from
            if saved["data_phase"] >= len(self.plan):
                raise ConfigError(
                    f"{path} was written in phase {saved['data_phase']} ({saved.get('name')!r}) but the config has "
                    f"{len(self.plan)} phase(s); resume with the phases the run was started with (docs/phases.md).")
            self._enter_data_phase(saved["data_phase"], carry_position=False)
        self.data.train.load_state_dict(restored.rank_state["data"])
        self.train_iter = iter(self.data.train)
        self.resumed_from_step = self.state.step

    def _device_name(self) -> str:
        device = self.accelerator.device
        return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type.upper()

    def _mfu_line(self) -> str:
        if self.run.trainer.peak_tflops:
            return f"MFU against trainer.peak_tflops = {self.peak_tflops:g} TFLOP/s per device"
        if self.peak_tflops:
            return f"MFU against {self._device_name()}'s bf16 dense peak {self.peak_tflops:g} TFLOP/s (train/flops.py)"
        return (f"train/mfu not logged: no peak FLOP/s known for {self._device_name()} "
                "(set trainer.peak_tflops); train/tflops is logged")

    def _log_startup(self, optimizer_lines: list[str]) -> None:
        t, acc = self.run.trainer, self.accelerator
        rows = t.per_device_train_batch_size * t.gradient_accumulation_steps * acc.num_processes
        seq = self.run.dataset.max_seq_length
        lines = [
            f"mode {distributed.mode(acc)} · world size {acc.num_processes} · device {acc.device} · "
            f"mixed precision {acc.mixed_precision} · model {self.num_params / 1e6:.2f}M params",
            f"batch: {t.per_device_train_batch_size} rows/device × {t.gradient_accumulation_steps} accumulation × "
            f"{acc.num_processes} processes = {rows} rows × {seq} tokens = {rows * seq:,} tokens/step "
            f"(≈{rows * seq * self.run.datacollator.mlm_probability:,.0f} masked)",
            f"steps: {self.max_steps} total, {effective_warmup(self.run.scheduler.warmup_steps, self.max_steps)} "
            f"warmup ({self.run.scheduler.name}), start at {self.state.step}",
            self._mfu_line(),
            *optimizer_lines,
            *phase_rules.describe_plan(self.plan, acc.num_processes),
            *(f"{key} = {note}" for key, note in self.resolved.items()),
        ]
        for line in lines:
            logger.info(line)

    # ---- the step ---------------------------------------------------------------------------------------------
    def train_step(self, should_log: bool) -> dict[str, float]:
        """One optimizer step over an accumulation window; returns metrics reduced over all ranks."""
        acc, tcfg = self.accelerator, self.run.trainer
        step = self.state.step + 1  # the step being produced (QK-clip counts from 1)
        window = [next(self.train_iter) for _ in range(self.accumulation)]
        # Global masked-token count of the window: every micro-batch loss is sum(CE)/global_count, so the summed
        # gradient is the exact token-mean over the whole global batch whatever the per-rank mask counts.
        counts = torch.stack([sum((b["labels"] != -100).sum() for b in window),
                              sum(b["attention_mask"].sum() for b in window)]).to(acc.device, torch.float64)
        distributed.all_reduce(counts)
        global_masked = counts[0].clamp(min=1)
        qk_clip = self.qk_clip  # step hook: records the step's batch or forward QK logits, clips after the update
        qk_kwargs = qk_clip.begin_step(step, should_log) if qk_clip is not None else {}  # same on every rank

        loss_sum = torch.zeros((), device=acc.device, dtype=torch.float64)
        for i, batch in enumerate(window):
            batch = self._to_device(batch)
            sync = i == len(window) - 1  # gradients are all-reduced / reduce-scattered on the last only
            with contextlib.nullcontext() if sync else distributed.no_sync(acc, self.model):
                out = self.model(**batch, num_items_in_batch=global_masked, **qk_kwargs)
                # DDP and FSDP2 average gradients over ranks; the loss is already divided by the global count,
                # so undo the average by scaling with the world size.
                acc.backward(out.loss * acc.num_processes)
            loss_sum += out.loss.detach().double()
            if qk_clip is not None:
                qk_clip.record(batch, out)

        max_norm = tcfg.max_grad_norm if tcfg.max_grad_norm is not None else math.inf
        replicas = self._replicate_group if self._optimizer_syncs_replicas else None
        grad_norm = distributed.clip_grad_norm(acc, self.model, max_norm, replicas)  # same on every rank
        # One all-reduce for the loss and a "some rank saw a non-finite value" flag.
        stats = torch.stack([loss_sum, (~torch.isfinite(loss_sum) | ~torch.isfinite(grad_norm.double())).double()])
        distributed.all_reduce(stats)
        # The step's ONE device->host sync (docs/benchmarks.md): the skip decision needs the flag on the host;
        # the loss, grad norm and token counts ride along in the same copy, so logging costs no extra sync.
        loss, nonfinite, grad_norm, masked, tokens = torch.cat([stats, grad_norm.double().reshape(1), counts]).tolist()
        nonfinite = nonfinite > 0
        lr = self.optimizer.param_groups[0]["lr"]

        metrics: dict[str, float] = {}
        if nonfinite:
            self.state.nonfinite_skipped += 1
            self._consecutive_nonfinite += 1
            logger.warning("step %d: non-finite loss %s / grad norm %s; update skipped (%d in a row)",
                           step, loss, grad_norm, self._consecutive_nonfinite)
        else:
            self._consecutive_nonfinite = 0
            self.optimizer.step()
            if qk_clip is not None:
                metrics.update(qk_clip.after_step(step))  # every rank: reduces and rescales W_q / W_k
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step = step
        self.state.tokens_seen += int(tokens)
        metrics.update({"train/loss": loss, "train/grad_norm": grad_norm, "train/lr": lr, "train/tokens": tokens,
                        "train/masked_tokens": masked})
        metrics.update(distributed.comm_bytes(self.model, self._raw_optimizer))
        metrics.update(self._source_tokens())
        return metrics

    def _flops_metrics(self, tokens: float, masked: float, elapsed: float) -> dict[str, float]:
        """``train/tflops`` (model TFLOP/s per device, formula in ``flops.py``) and ``train/mfu`` when a peak is known."""
        config = self.unwrapped.config
        decoded = masked if config.masked_logits_only else tokens
        total = throughput_flops(config, tokens=tokens, masked_tokens=decoded, seq_len=self.data.tokens_per_row)
        tflops = total / max(elapsed, 1e-9) / self.accelerator.num_processes / 1e12
        out = {"train/tflops": tflops}
        if self.peak_tflops:
            out["train/mfu"] = mfu(tflops, self.peak_tflops)
        return out

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Move a host batch to the device, with its host-computed metadata (:func:`with_host_metadata`)."""
        batch = with_host_metadata(batch, self.unwrapped.config)
        return {k: v.to(self.accelerator.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}  # pinned batches (trainer.dataloader_pin_memory): asynchronous copies

    def _source_tokens(self) -> dict[str, float]:
        """``data/tokens/<source>``: global tokens drawn from each mixture source so far (empty otherwise)."""
        train = self.data.train
        if train.source_tokens is None:
            return {}
        return {f"data/tokens/{label}": float(n) for label, n in zip(train.labels, train.source_tokens, strict=True)}

    # ---- eval -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-weighted MLM loss and masked-token accuracy on the fixed eval budget (every rank enters)."""
        acc = self.accelerator
        self.model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=acc.device)  # CE sum | correct | masked tokens
        for batch in self.data.eval_batches():
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            out = self.model(**batch, num_items_in_batch=1)  # loss = sum of token CE
            labels = batch["labels"]
            selected = labels != -100
            logits = out.logits if out.logits.dim() == 2 else out.logits[selected]  # (num_masked, V)
            sums += torch.stack([out.loss.double(), (logits.argmax(-1) == labels[selected]).sum().double(),
                                 selected.sum().double()])
        distributed.all_reduce(sums)
        self.model.train()
        count = sums[2].clamp(min=1)
        return {"eval/loss": (sums[0] / count).item(), "eval/accuracy": (sums[1] / count).item()}

    def _downstream_due(self, step: int) -> bool:
        tcfg = self.run.trainer
        if not tcfg.downstream_suites:
            return False
        if tcfg.downstream_steps is not None:
            return step % tcfg.downstream_steps == 0 or step == self.max_steps
        return self.checkpointer.should_save(step)

    def downstream(self) -> dict[str, float]:
        """``trainer.downstream_suites`` (PPPL, probe) on the live model; every rank enters (work is split)."""
        from neobert_pt.evaluate.suites import run_downstream

        results = run_downstream(self.unwrapped, self.tokenizer, self.run)
        self.model.train()
        self.metrics.message(f"step {self.state.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in results.items()))
        return results

    # ---- the run ----------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to ``trainer.max_steps``; save checkpoints, the final model and the summary. Returns the summary."""
        tcfg, acc = self.run.trainer, self.accelerator
        self._consecutive_nonfinite = 0
        start_wall = time.perf_counter()
        window_start, window_steps, window_tokens, window_masked = time.perf_counter(), 0, 0, 0
        last_eval: dict[str, float] = {}
        self.model.train()
        self._stop.install()  # SIGTERM / SIGINT: finish the step, save, summarise, exit 75 (signals.py)
        while self.state.step < self.max_steps:
            next_step = self.state.step + 1
            should_log = next_step % tcfg.logging_steps == 0 or next_step in (1, self.max_steps)
            self._sync_phase()
            m = self.train_step(should_log)
            step = self.state.step
            window_steps += 1
            window_tokens += m.pop("train/tokens")
            window_masked += m.pop("train/masked_tokens")
            if self._consecutive_nonfinite >= tcfg.max_consecutive_nonfinite:
                self._stop_nonfinite(step, m, time.perf_counter() - start_wall)
            if should_log:
                elapsed = time.perf_counter() - window_start
                m.update({"train/tokens_per_sec": window_tokens / elapsed, "train/steps_per_sec": window_steps / elapsed,
                          "train/peak_memory_mb": peak_memory_mb(acc.device),
                          "train/nonfinite_skipped": self.state.nonfinite_skipped, **self._phase_metrics(),
                          **self._flops_metrics(window_tokens, window_masked, elapsed)})
                window_start, window_steps, window_tokens, window_masked = time.perf_counter(), 0, 0, 0
                self.metrics.log(step, m)
            if (tcfg.eval_steps and step % tcfg.eval_steps == 0) or step == self.max_steps:
                last_eval = self.evaluate()
                self.metrics.log(step, last_eval)
                self.metrics.message(f"step {step}: eval loss {last_eval['eval/loss']:.4f} "
                                     f"accuracy {last_eval['eval/accuracy']:.3f}")
            if self._downstream_due(step):
                self.metrics.log(step, self.downstream())
            self.metrics.advance(step, {"loss": m["train/loss"], "lr": m["train/lr"],
                                        **({"tok/s": m["train/tokens_per_sec"]} if should_log else {})})
            if self.checkpointer.should_save(step) or any(step == p.end for p in self.plan):  # + phase boundaries
                self._save(step)
            if self._stop.requested(acc.device) and step < self.max_steps:  # every rank agrees on the step
                return self._stop_for_signal(step, time.perf_counter() - start_wall)
        if tcfg.save_final_model:
            self.save_final_model()
        return self._finish(time.perf_counter() - start_wall)

    def _stop_for_signal(self, step: int, wall_time: float) -> dict[str, Any]:
        """After a SIGTERM / SIGINT: checkpoint this step (unless just saved), write the summary, exit code 75."""
        from neobert_pt.cli import EXIT_INTERRUPTED

        if not self.checkpointer.should_save(step):
            self._save(step)
        self.status = f"interrupted by {self._stop.name} after step {step}"
        self.exit_code = EXIT_INTERRUPTED
        summary = self._finish(wall_time)
        logger.warning("stopped by %s after step %d; checkpoint step_%d saved. Continue with "
                       "--trainer.resume_from_checkpoint latest", self._stop.name, step, step)
        return summary

    def _stop_nonfinite(self, step: int, metrics: dict[str, float], wall_time: float) -> None:
        """Too many non-finite steps: record the step, save only finite weights, write the summary, raise."""
        self.metrics.log(step, {**metrics, "train/nonfinite_skipped": self.state.nonfinite_skipped})
        finite = torch.ones(1, device=self.accelerator.device)
        for p in self.model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if not torch.isfinite(local).all():
                finite.zero_()
                break
        weights_ok = distributed.all_reduce(finite, op="min").item() > 0
        if weights_ok:
            self._save(step)
            where = f"The last good weights are in {self.checkpointer.root / f'step_{step}'}."
        else:  # e.g. corrupted weights: never publish them, `latest` keeps pointing at the last good checkpoint
            target = self.checkpointer.pointer_target()
            where = (f"The weights themselves are non-finite and were NOT saved; `latest` still points at "
                     f"{target.name if target else 'no checkpoint'}.")
        self.status = f"stopped: {self._consecutive_nonfinite} consecutive non-finite steps at step {step}"
        self._finish(wall_time)
        raise NonFiniteLossError(
            f"{self._consecutive_nonfinite} consecutive non-finite steps (last at step {step}); stopped. {where} "
            "Lower optimizer.lr (on resume the current config's value is used) or raise "
            "trainer.max_consecutive_nonfinite."
        )

    def _save(self, step: int) -> None:
        # Dion with compressed replica sync keeps per-replica momenta; a checkpoint holds their mean (every rank).
        sync_for_checkpoint = getattr(self._raw_optimizer, "synchronize_for_checkpoint", None)
        if sync_for_checkpoint is not None:
            sync_for_checkpoint()
        self.checkpointer.save(
            step, rank_state={"data": self.data.train.state_dict(), "phase": self._phase_state()},
            trainer_state=self.state.state_dict(),
            write_config=self._write_config_and_mesh,
        )

    def _write_config_and_mesh(self, path: Path) -> None:
        save_config(self.run, path)
        (path.parent / distributed.MESH_FILE).write_text(
            json.dumps({"mesh": distributed.mesh_description(self.accelerator)}))

    def save_final_model(self) -> Path:
        """``final/``: the full HF model (gathered from FSDP2 shards) and the tokenizer."""
        final = self.output_dir / FINAL_DIR
        state_dict = distributed.full_state_dict(self.accelerator, self.model)  # collective under FSDP2
        if self.accelerator.is_main_process:
            # Export from a plain instance: under FSDP2 the live model's class is a generated FSDP subclass, and
            # save_pretrained would ship torch's FSDP sources as "remote code" next to ours.
            with torch.random.fork_rng(devices=[]):
                export = self._model_cls(self.unwrapped.config)
            export.load_state_dict(state_dict)
            export.save_pretrained(final, safe_serialization=True)
            self.tokenizer.save_pretrained(final)
        self.accelerator.wait_for_everyone()
        return final

    def _finish(self, wall_time: float) -> dict[str, Any]:
        acc = self.accelerator
        summary = build_summary(
            read_metrics(self.output_dir / METRICS_FILE) if acc.is_main_process else [],
            steps=self.state.step, tokens=self.state.tokens_seen, nonfinite_skipped=self.state.nonfinite_skipped,
            wall_time_sec=round(wall_time, 2), mode=distributed.mode(acc), world_size=acc.num_processes,
            optimizer=self.run.optimizer.name, params_m=round(self.num_params / 1e6, 3),
            resumed_from_step=self.resumed_from_step, status=self.status,
            output_dir=".",  # paths relative to the run directory
            config=CONFIG_FILE,
        )
        summary.update({key: int(n) for key, n in self._source_tokens().items()})  # per mixture source
        if acc.is_main_process:
            records = read_metrics(self.output_dir / METRICS_FILE)
            write_summary(self.output_dir, summary, records)
            self.metrics.message("\n" + summary_table(summary))
        acc.wait_for_everyone()
        return summary

    def close(self) -> None:
        """Flush writers, release log handlers and (when the trainer created it) end the accelerator's run."""
        if getattr(self, "_stop", None) is not None:
            self._stop.uninstall()
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
            self.metrics = None
        root = logging.getLogger("neobert_pt")
        for h in getattr(self, "_handlers", []):
            root.removeHandler(h)
            h.close()
        self._handlers = []
        if getattr(self, "data", None) is not None:
            self.data.train.close()  # stops loader workers
        if getattr(self, "_owns_accelerator", False):
            self._owns_accelerator = False
            self.accelerator.end_training()  # tears down the process group once, on both success and failure
