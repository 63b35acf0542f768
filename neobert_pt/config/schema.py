"""The run configuration: nested dataclasses that are the single source of truth for every option.

Every field is declared with :func:`option` (default + one-line doc). YAML files and dotted CLI overrides
(``--trainer.max_steps 200``) are validated against these classes by :mod:`neobert_pt.config.loader`;
``docs/configuration.md`` and ``pretrain.py --help`` are generated from them. Cross-field rules live in
``__post_init__`` and raise :class:`ConfigError` naming the option that fixes the problem.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields
from typing import Any, Literal

from neobert_pt.errors import ConfigError
from neobert_pt.fields import option
from neobert_pt.modeling.configuration_neobert import (
    ATTN_IMPLEMENTATIONS,
    HIDDEN_ACTS,
    NeoBERTConfig,
    check_architecture,
)
from neobert_pt.optim.config import OptimizerConfig

# The model section derives from NeoBERTConfig: its signature holds the defaults of every architecture key and
# check_architecture holds their checks (neobert_pt/modeling/configuration_neobert.py), so they live in one place;
# this section adds the one-line docs of the run config and the training-only keys (vocab_size: null, 'auto'
# attention, scaling_rule, heads).
_NEOBERT_DEFAULTS = {name: p.default for name, p in inspect.signature(NeoBERTConfig.__init__).parameters.items()
                     if p.default is not inspect.Parameter.empty}
TRAINING_ONLY_MODEL_KEYS = ("vocab_size", "scaling_rule", "heads")  # not NeoBERTConfig arguments as they stand here


def _architecture(name: str, help: str) -> Any:  # noqa: A002 - the same name as option()'s
    """An option of the model section whose default is NeoBERTConfig's argument of the same name."""
    return option(_NEOBERT_DEFAULTS[name], help)


@dataclass
class ModelConfig:
    """NeoBERT architecture. Defaults reproduce the 100M recipe (hidden 768, 12 layers, 12 heads)."""

    hidden_size: int = _architecture("hidden_size", "Width of the residual stream.")
    num_hidden_layers: int = _architecture("num_hidden_layers", "Number of encoder blocks (the 250M recipe uses 28).")
    num_attention_heads: int = _architecture(
        "num_attention_heads", "Attention heads per block; hidden_size must be divisible by it.")
    intermediate_size: int = _architecture(
        "intermediate_size",
        "Nominal FFN width; SwiGLU uses 2/3 of it (rounded up to a multiple of 8) so FLOPs match a GELU FFN.",
    )
    vocab_size: int | None = option(None, "Vocabulary size; null takes it from the tokenizer.")
    max_position_embeddings: int = _architecture(
        "max_position_embeddings", "Longest sequence the rotary embedding is built for.")
    norm_eps: float = _architecture("norm_eps", "Epsilon of the RMSNorm / LayerNorm layers.")
    rope_theta: float = _architecture("rope_theta", "Rotary embedding base.")
    hidden_act: Literal[HIDDEN_ACTS] = _architecture("hidden_act", "FFN activation.")
    rms_norm: bool = _architecture("rms_norm", "RMSNorm (true) or LayerNorm (false) for the pre-norms.")
    dropout: float = _architecture(
        "dropout",
        "Residual dropout on the attention block's output and the FFN output (training only; attention "
        "probabilities are never dropped). NeoBERT pretrains without dropout.",
    )
    tie_word_embeddings: bool = _architecture("tie_word_embeddings", "Tie the MLM decoder to the token embedding.")
    initializer_range: float = _architecture(
        "initializer_range", "Std of the normal init of linear and embedding weights.")
    attn_implementation: Literal[ATTN_IMPLEMENTATIONS] = _architecture(
        "attn_implementation",
        "Attention backend. 'auto' picks the fastest exact one and logs one line saying which and why: on CUDA "
        "flash_attention_2 with flash-attn, else varlen (torch's varlen_attn, when this torch has it), else "
        "flex_attention (compiled, document block mask; also in fp32, as the varlen kernels need bf16); sdpa on CPU. "
        "The varlen backends unpad once per forward.",
    )
    masked_logits_only: bool = _architecture(
        "masked_logits_only", "Compute the MLM decoder only on masked positions (same loss, far less compute)."
    )
    scaling_rule: str | None = option(
        None,
        "Derive num_attention_heads / hidden_size / num_hidden_layers / intermediate_size from model.heads with "
        "the named rule of neobert_pt/config/scaling_rules.yaml (replacing any values given for them); null: off.",
    )
    heads: int | None = option(None, "Head count fed to model.scaling_rule (required with it, unused without).")

    def __post_init__(self) -> None:
        if self.scaling_rule is not None or self.heads is not None:
            from neobert_pt.config.scaling import apply_scaling_rule

            apply_scaling_rule(self)
        try:
            check_architecture(
                hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
                num_attention_heads=self.num_attention_heads, intermediate_size=self.intermediate_size,
                hidden_act=self.hidden_act, dropout=self.dropout, attn_implementation=self.attn_implementation,
                prefix="model.",
            )
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def architecture(self) -> dict[str, Any]:
        """The keys that are NeoBERTConfig arguments (everything but the training-only keys)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in TRAINING_ONLY_MODEL_KEYS}

    def neobert_config(self, *, vocab_size: int, **extra: Any) -> NeoBERTConfig:
        """The model's ``NeoBERTConfig``: this section's architecture, the resolved ``vocab_size`` and ``extra``
        arguments (``pad_token_id``, or a resolved ``attn_implementation`` that replaces this section's)."""
        return NeoBERTConfig(**{**self.architecture(), **extra}, vocab_size=vocab_size)


@dataclass
class DatasetConfig:
    """Where the training text comes from and how it becomes fixed-length packed rows."""

    name: str = option(
        "embedded",
        "'embedded' (corpus shipped with the package), a Hub dataset name, a builder for local files "
        "('text', 'json', 'parquet') used with data_files, or 'tokenized' with data_files set to a directory "
        "written by `python -m neobert_pt.data prepare`.",
    )
    config_name: str | None = option(None, "Hub dataset configuration (subset) name.")
    data_files: list[str] | None = option(None, "Local files or globs for the 'text'/'json'/'parquet' builders.")
    split: str = option("train", "Split used for training.")
    eval_split: str | None = option(None, "Split used for eval; null holds out eval_fraction of the train documents.")
    eval_fraction: float = option(0.01, "Fraction of documents held out for eval when eval_split is null.")
    text_column: str = option("text", "Column holding the raw text.")
    streaming: bool = option(False, "Stream the dataset instead of downloading and tokenizing it up front.")
    max_seq_length: int = option(512, "Tokens per packed row (the model's training sequence length).")
    packing: bool = option(True, "Pack several documents per row with block-diagonal attention; false pads.")
    max_documents: int | None = option(None, "Use only the first N documents (quick experiments).")
    num_proc: int | None = option(None, "Processes for tokenization (null: single process).")
    cache_dir: str | None = option(None, "Cache for tokenized data (null: the datasets default cache).")
    shuffle_buffer_size: int = option(10000, "Shuffle buffer for streaming datasets.")
    mixture: list[Any] = option(
        [],
        "Weighted mixture of sources, each {name, weight, data_files, config_name, split, text_column, label}; "
        "rows are drawn by position in proportion to weight (replaces name/data_files; see docs/data.md).",
    )

    def __post_init__(self) -> None:
        _require_positive(self, "dataset", "max_seq_length", "shuffle_buffer_size")
        if self.mixture:
            _check_mixture(self.mixture, self.streaming)
        if self.name == "tokenized" and (not self.data_files or len(self.data_files) != 1):
            raise ConfigError(
                "dataset.name 'tokenized' reads one prepared directory: set dataset.data_files to it, e.g. "
                "--dataset.data_files '[data/tokenized]' (make it with `python -m neobert_pt.data prepare`)."
            )
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"dataset.eval_fraction must be in [0, 1), got {self.eval_fraction}.")
        if self.name in _FILE_BUILDERS and not self.data_files:
            raise ConfigError(
                f"dataset.name {self.name!r} reads local files: set dataset.data_files, e.g. "
                f"--dataset.data_files '[corpus/*.{self.name}]'."
            )


@dataclass
class TokenizerConfig:
    """Which tokenizer turns text into ids."""

    name: str = option(
        "embedded",
        "'embedded' (bert-base-uncased WordPiece vocab shipped with the package), a Hub name or local path, "
        "or 'train' to train a WordPiece tokenizer on the dataset.",
    )
    vocab_size: int = option(30522, "Vocabulary size when name is 'train'.")
    lowercase: bool = option(True, "Lower-case text (embedded and trained tokenizers).")


@dataclass
class DataCollatorConfig:
    """Masked-language-model corruption."""

    mlm_probability: float = option(0.2, "Fraction of non-special tokens selected for prediction (NeoBERT: 20%).")
    mask_replace_prob: float = option(0.8, "Of the selected tokens, fraction replaced by [MASK].")
    random_replace_prob: float = option(0.1, "Of the selected tokens, fraction replaced by a random token.")
    pad_to_multiple_of: int | None = option(8, "Pad unpacked batches to a multiple of this (tensor-core friendly).")

    def __post_init__(self) -> None:
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError(f"datacollator.mlm_probability must be in (0, 1), got {self.mlm_probability}.")
        if min(self.mask_replace_prob, self.random_replace_prob) < 0.0 or (
            self.mask_replace_prob + self.random_replace_prob > 1.0
        ):
            raise ConfigError(
                "datacollator.mask_replace_prob + datacollator.random_replace_prob must be non-negative and at most "
                f"1 (the rest keeps the original token), got {self.mask_replace_prob} + {self.random_replace_prob}."
            )


@dataclass
class SchedulerConfig:
    """Learning-rate schedule: linear warmup, then the chosen decay."""

    name: Literal["cosine", "linear", "constant", "wsd"] = option(
        "cosine", "Decay after warmup; 'wsd' = warmup-stable-decay."
    )
    warmup_steps: int = option(100, "Linear warmup length in optimizer steps.")
    decay_steps: int | None = option(None, "For 'wsd': length of the final decay (null: 10% of max_steps).")
    min_lr_ratio: float = option(0.1, "Final LR as a fraction of the peak LR (cosine, linear, wsd).")

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ConfigError(f"scheduler.warmup_steps must be >= 0, got {self.warmup_steps}.")
        if self.decay_steps is not None and self.decay_steps < 1:
            raise ConfigError(f"scheduler.decay_steps must be >= 1 or null, got {self.decay_steps}.")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"scheduler.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}.")


@dataclass
class TrainerConfig:
    """The training loop: batch math, precision, logging, eval, checkpoints, resume."""

    output_dir: str = option("./outputs/neobert", "Run directory: config, metrics, checkpoints, final model.")
    overwrite_output_dir: bool = option(False, "Allow starting fresh in a directory that holds another run.")
    max_steps: int | Literal["auto"] = option(
        1000,
        "Optimizer steps to train for; 'auto': trainer.tokens_per_param x non-embedding parameters / tokens per "
        "step (with phases that all have a length: their total). The resolved number is written to config.yaml.",
    )
    tokens_per_param: float = option(
        20.0,
        "Training tokens per non-embedding parameter for max_steps: auto (20 is the Chinchilla rule for decoder "
        "LMs, a starting point for encoders, not a tuned optimum).",
    )
    per_device_train_batch_size: int = option(32, "Rows per micro-batch on each process.")
    per_device_eval_batch_size: int = option(32, "Rows per eval batch on each process.")
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer step.")
    mixed_precision: Literal["no", "bf16"] = option(
        "no", "bf16 autocast where the device supports it (else falls back to fp32 with a one-line notice)."
    )
    max_grad_norm: float | None = option(1.0, "Clip the global gradient norm to this (null: no clipping).")
    logging_steps: int = option(10, "Log metrics every N optimizer steps.")
    eval_steps: int | None = option(500, "Evaluate every N optimizer steps (null: only at the end).")
    eval_max_batches: int = option(20, "Fixed eval budget: batches per process per evaluation.")
    save_steps: int | None = option(1000, "Checkpoint every N optimizer steps (always also at the final step).")
    save_total_limit: int | None = option(3, "Keep at most N checkpoints (null: keep all).")
    resume_from_checkpoint: bool | str | None = option(
        None,
        "'latest' or true: the checkpoint output_dir/checkpoints/latest names, verified (fresh start if there is no "
        "checkpoint folder yet; an error if none is usable); a checkpoint path; null or false: start fresh. "
        "Resolved to 'latest', a path, or null. Hyperparameters and schedule come from the current config.",
    )
    max_consecutive_nonfinite: int = option(
        5, "Stop (saving the last good state) after this many consecutive non-finite losses or grad norms."
    )
    disable_tqdm: bool = option(False, "Hide the progress bar.")
    dataloader_num_workers: int = option(
        0, "DataLoader worker processes that read and collate micro-batches ahead of the step (0: in the trainer)."
    )
    dataloader_prefetch_factor: int = option(4, "Micro-batches each worker prepares ahead (with workers > 0).")
    dataloader_pin_memory: bool = option(True, "Pin host batches for asynchronous copies (CUDA only).")
    activation_checkpointing: bool = option(False, "Recompute block activations in backward to save memory.")
    torch_compile: bool = option(
        False, "torch.compile each encoder block (after activation checkpointing, before the DDP/FSDP2 wrap)."
    )
    peak_tflops: float | None = option(
        None,
        "Peak TFLOP/s per device that train/mfu divides by (null: the bf16 dense peak of the device from the table "
        "in neobert_pt/train/flops.py; a CPU or an unlisted GPU then logs train/tflops only).",
    )
    save_final_model: bool = option(True, "Write the final Hugging Face model + tokenizer to output_dir/final.")
    downstream_suites: list[Literal["pppl", "probe"]] = option(
        [],
        "Cheap downstream suites run on the live model (every rank takes part): 'pppl' (exact pseudo-perplexity "
        "on the embedded corpus hold-out), 'probe' (word-order probe on the embedded corpus). Logged as "
        "downstream/<suite>/<metric>; see docs/evaluation.md.",
    )
    downstream_steps: int | None = option(
        None, "Run downstream_suites every N steps (null: at every checkpoint save and at the final step)."
    )
    downstream_pppl_tokens: int = option(2048, "PPPL budget: scored tokens per downstream evaluation.")
    downstream_probe_windows: int = option(400, "Probe budget: corpus windows (x2: as written and shuffled).")
    distributed_timeout_s: int = option(
        600, "Collective timeout in seconds (process group): a stalled or stopped rank makes every other rank fail "
        "within this time instead of hanging (gloo's default is 30 min). Raise it if rank 0 alone prepares a large "
        "dataset while the others wait."
    )

    def __post_init__(self) -> None:
        # One spelling downstream: the trainer only ever sees 'latest', a path, or None.
        if self.resume_from_checkpoint is True:
            self.resume_from_checkpoint = "latest"
        elif self.resume_from_checkpoint is False or self.resume_from_checkpoint == "":
            self.resume_from_checkpoint = None
        if self.max_steps != "auto" and self.max_steps < 1:
            raise ConfigError(f"trainer.max_steps must be >= 1, got {self.max_steps} (or 'auto').")
        if not self.tokens_per_param > 0:
            raise ConfigError(f"trainer.tokens_per_param must be > 0, got {self.tokens_per_param}.")
        _require_positive(
            self,
            "trainer",
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "eval_max_batches",
            "max_consecutive_nonfinite",
            "downstream_pppl_tokens",
            "downstream_probe_windows",
            "distributed_timeout_s",
        )
        for name in ("eval_steps", "save_steps", "save_total_limit", "downstream_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"trainer.{name} must be >= 1 or null, got {value}.")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError(f"trainer.max_grad_norm must be > 0 or null (no clipping), got {self.max_grad_norm}.")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ConfigError(f"trainer.peak_tflops must be > 0 or null (look the device up), got {self.peak_tflops}.")
        if self.dataloader_num_workers < 0:
            raise ConfigError(f"trainer.dataloader_num_workers must be >= 0, got {self.dataloader_num_workers}.")
        if self.dataloader_prefetch_factor < 1:
            raise ConfigError(
                f"trainer.dataloader_prefetch_factor must be >= 1, got {self.dataloader_prefetch_factor}.")


@dataclass
class PhaseConfig:
    """One entry of ``phases``: a length, and what changes from its first step on (null: keep the run's value).

    Settings not given fall back to the run's sections (dataset, model, datacollator, trainer), not to the
    previous phase. The LR follows ``scheduler`` over the whole run unless ``lr_schedule`` is 'segment'.
    """

    name: str | None = option(None, "Label shown in logs and checkpoints (null: phase<index>).")
    steps: int | None = option(None, "Length in optimizer steps (give one of steps / tokens / until_step).")
    tokens: int | None = option(
        None, "Length in tokens (rows x sequence length, summed over steps and processes), rounded up to whole steps."
    )
    until_step: int | None = option(None, "Ends after this global optimizer step (an absolute end).")
    max_seq_length: int | None = option(None, "dataset.max_seq_length in this phase (the data is re-packed).")
    rope_theta: float | None = option(None, "model.rope_theta in this phase (the rotary frequencies are rebuilt).")
    per_device_train_batch_size: int | None = option(None, "Rows per micro-batch in this phase.")
    gradient_accumulation_steps: int | None = option(None, "Micro-batches per optimizer step in this phase.")
    batch_warmup_steps: int = option(
        0, "Batch-size warmup: ramp the accumulation from batch_warmup_start_accumulation up over these steps."
    )
    batch_warmup_tokens: int | None = option(
        None, "Batch-size warmup measured in tokens instead: the accumulation rises linearly with the phase's tokens "
        "until this many have been consumed (exclusive with batch_warmup_steps)."
    )
    batch_warmup_start_accumulation: int = option(1, "Micro-batches per step at the first step of the warmup.")
    mlm_probability: float | None = option(None, "Masking rate at the phase's start (null: datacollator's).")
    mlm_schedule: Literal["constant", "linear", "cosine", "step"] = option(
        "constant",
        "Masking rate within the phase: constant; linear / cosine from mlm_probability to mlm_probability_end; "
        "step: the values of mlm_values, each for an equal share of the phase.",
    )
    mlm_probability_end: float | None = option(None, "Masking rate at the phase's last step (linear / cosine).")
    mlm_values: list[float] = option([], "Masking rates of the 'step' schedule, in order.")
    lr_schedule: Literal["run", "segment"] = option(
        "run", "'run': the scheduler section over the whole run; 'segment': this phase's own warmup-stable-decay."
    )
    lr_warmup_steps: int = option(
        0, "Segment: ramp linearly from the LR the previous step used (0 at the run's start) to lr_peak."
    )
    lr_peak: float = option(1.0, "Segment: LR after warmup, as a fraction of optimizer.lr.")
    lr_decay: Literal["none", "linear", "cosine", "1-sqrt"] = option("none", "Segment: decay shape at the end.")
    lr_decay_steps: int | None = option(None, "Segment: steps of the final decay (null: all steps after warmup).")
    lr_end: float = option(0.0, "Segment: LR at the phase's last step after a decay, as a fraction of optimizer.lr.")


@dataclass
class WandbConfig:
    """Weights & Biases logging (the same metrics as metrics.jsonl)."""

    mode: Literal["online", "offline", "disabled"] = option("disabled", "W&B mode; 'disabled' costs nothing.")
    project: str = option("neobert_pt", "W&B project.")
    entity: str | None = option(None, "W&B entity (team or user).")
    name: str | None = option(None, "Run name (null: derived from the output dir).")
    group: str | None = option(None, "Run group (the robustness runner groups a matrix).")
    tags: list[str] = option([], "Run tags.")
    dir: str | None = option(None, "Where W&B writes its files (null: output_dir).")


@dataclass
class RunConfig:
    """Everything one pretraining run needs."""

    model: ModelConfig = option(ModelConfig, "Model architecture.")
    dataset: DatasetConfig = option(DatasetConfig, "Training data.")
    tokenizer: TokenizerConfig = option(TokenizerConfig, "Tokenizer.")
    datacollator: DataCollatorConfig = option(DataCollatorConfig, "MLM masking.")
    trainer: TrainerConfig = option(TrainerConfig, "Training loop.")
    optimizer: OptimizerConfig = option(OptimizerConfig, "Optimizer and its per-algorithm sub-blocks.")
    scheduler: SchedulerConfig = option(SchedulerConfig, "Learning-rate schedule.")
    wandb: WandbConfig = option(WandbConfig, "Weights & Biases.")
    seed: int = option(0, "Seed for model init, data order and masking.")
    phases: list[PhaseConfig] = option(
        [], "Training phases, run in order (see docs/phases.md); empty: one flat run as configured above."
    )

    def __post_init__(self) -> None:
        if self.dataset.max_seq_length > self.model.max_position_embeddings:
            raise ConfigError(
                f"dataset.max_seq_length ({self.dataset.max_seq_length}) exceeds model.max_position_embeddings "
                f"({self.model.max_position_embeddings}); raise the latter or shorten the rows."
            )
        if self.phases:
            from neobert_pt.config.phases import validate_phases

            validate_phases(self)


_FILE_BUILDERS = ("text", "json", "parquet")
MIXTURE_KEYS = ("name", "weight", "data_files", "config_name", "split", "text_column", "label")


def _check_mixture(mixture: list[Any], streaming: bool) -> None:
    """Each entry is a mapping with a name and a positive weight; labels are unique."""
    if streaming:
        raise ConfigError("dataset.mixture reads map-style sources: set dataset.streaming false (or prepare each "
                          "source with `python -m neobert_pt.data prepare` and mix the 'tokenized' directories).")
    labels = []
    for i, entry in enumerate(mixture):
        where = f"dataset.mixture[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a mapping like {{name: json, data_files: [web/*.jsonl], weight: 0.5}}.")
        unknown = sorted(set(entry) - set(MIXTURE_KEYS))
        if unknown:
            raise ConfigError(f"{where} has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(MIXTURE_KEYS)}.")
        if not isinstance(entry.get("name"), str):
            raise ConfigError(f"{where}.name is required (a builder, 'tokenized', 'embedded' or a Hub dataset).")
        weight = entry.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ConfigError(f"{where}.weight must be a number > 0, got {weight!r}.")
        files = entry.get("data_files")
        if isinstance(files, str):
            entry["data_files"] = [files]
        if (entry["name"] in _FILE_BUILDERS or entry["name"] == "tokenized") and not entry.get("data_files"):
            raise ConfigError(f"{where} (name {entry['name']!r}) reads local files: set its data_files.")
        labels.append(str(entry.get("label") or entry["name"]))
    if len(set(labels)) != len(labels):
        raise ConfigError("dataset.mixture sources need distinct labels (set `label` on sources sharing a name): "
                          + ", ".join(labels) + ".")


def _require_positive(section: object, prefix: str, *names: str) -> None:
    """Counts and sizes must be >= 1; the message names the dotted key and the value."""
    for name in names:
        value = getattr(section, name)
        if value < 1:
            raise ConfigError(f"{prefix}.{name} must be >= 1, got {value}.")
