"""Which model to evaluate: a run directory, a ``final/`` (or any ``save_pretrained``) directory, a training
checkpoint ``checkpoints/step_N``, or a Hub id; and where its results go.

A training checkpoint holds the raw ``accelerator.save_state`` weights plus the run's ``config.yaml``; it is turned
into a regular Hugging Face model directory (model + tokenizer) in a temporary folder, so every suite loads its head
with the usual ``from_pretrained``. Results are written next to the model: ``final/`` (or the given model directory)
for a model, ``RUN/eval/step_N/`` for a checkpoint (a sealed checkpoint is never modified), and
``./eval_results/<owner>__<name>/`` for a Hub id.
"""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from neobert_pt.evaluate.errors import EvalError

logger = logging.getLogger(__name__)

RESULTS_JSON = "eval_results.json"
RESULTS_MD = "eval_results.md"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_STEP = re.compile(r"^step_(\d+)$")


@dataclass
class ModelSource:
    """A loadable model directory plus what is known about where it came from."""

    spec: str  # what the user passed
    model_dir: Path  # a from_pretrained-able directory (config.json, weights, tokenizer)
    results_dir: Path
    run_dir: Path | None = None
    step: int | None = None
    hub_id: str | None = None
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def display_name(self) -> str:
        """What results and cards call the model: the Hub id, or the path from the run directory's parent
        (``tiny/final``, ``tiny/checkpoints/step_200``), never a full local path."""
        if self.hub_id:
            return self.hub_id
        path = Path(self.spec).expanduser().resolve()
        base = self.run_dir.parent if self.run_dir else path.parent
        return str(path.relative_to(base)) if path.is_relative_to(base) else path.name

    def cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def resolve_model(spec: str, results_dir: str | Path | None = None) -> ModelSource:
    """Turn ``MODEL_OR_RUN_DIR`` into a :class:`ModelSource` (raises :class:`EvalError` with one line)."""
    path = Path(spec).expanduser()
    out = Path(results_dir) if results_dir else None
    if path.is_dir():
        path = path.resolve()
        if (path / "final" / "config.json").is_file():
            return ModelSource(spec, path / "final", out or path / "final", run_dir=path)
        if (path / "config.json").is_file():
            parent = path.parent
            run_dir = parent if (parent / "config.yaml").is_file() else None
            return ModelSource(spec, path, out or path, run_dir=run_dir)
        if is_checkpoint(path):
            return _from_checkpoint(spec, path, out)
        if (path / "checkpoints").is_dir():
            raise EvalError(f"{path} has no final/ model (the run did not finish or trainer.save_final_model was "
                            f"false); pass a checkpoint instead, e.g. {path / 'checkpoints' / 'step_N'}")
        raise EvalError(f"{path} is not a run directory (final/), a model directory (config.json) or a training "
                        f"checkpoint (config.yaml + model.safetensors or {FSDP_MODEL_DIR}/)")
    if path.exists():
        raise EvalError(f"{spec} is a file; pass a run, model or checkpoint directory")
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return _from_hub(spec, out)
    raise EvalError(f"model '{spec}' not found: not a local directory and not a Hub id (owner/name)")


def _from_hub(repo_id: str, out: Path | None) -> ModelSource:
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.py", "*.txt", "*.model"])
    except Exception as err:  # offline, not found, gated: the hub client raises several unrelated types
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise EvalError(f"Hub model '{repo_id}' cannot be reached or is not cached ({type(err).__name__}: {first}); "
                        "pass a local directory (a run dir, final/ or checkpoints/step_N) instead") from err
    results = out or Path("eval_results") / repo_id.replace("/", "__")
    return ModelSource(repo_id, Path(local), results, hub_id=repo_id)


FSDP_MODEL_DIR = "pytorch_model_fsdp_0"  # accelerate's sharded (DCP) model state under FSDP2


def is_checkpoint(path: Path) -> bool:
    """A trainer checkpoint (``accelerator.save_state`` weights + ``config.yaml``), not a ``save_pretrained`` dir."""
    weights = (path / "model.safetensors").is_file() or (path / FSDP_MODEL_DIR).is_dir()
    return (path / "config.yaml").is_file() and weights and not (path / "config.json").is_file()


def _checkpoint_state_dict(ckpt: Path) -> dict:
    """The full model state dict of a checkpoint: ``model.safetensors`` (one process / DDP) or the FSDP2 DCP shards
    gathered into one file on this process (no process group needed)."""
    import torch
    from safetensors.torch import load_file

    if (ckpt / "model.safetensors").is_file():
        return load_file(str(ckpt / "model.safetensors"))
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory(prefix="neobert_dcp_") as tmp:
        full = Path(tmp) / "model.pt"
        dcp_to_torch_save(ckpt / FSDP_MODEL_DIR, full)
        state = torch.load(full, map_location="cpu", weights_only=True)
    return state.get("model", state)  # accelerate saves {"model": state_dict}


def materialize_checkpoint(ckpt: Path) -> tuple[tempfile.TemporaryDirectory, int | None]:
    """``checkpoints/step_N`` as model + tokenizer in a temporary directory (caller cleans it up) and its step."""
    import torch

    from neobert_pt.config import load_config
    from neobert_pt.data import build_tokenizer
    from neobert_pt.modeling import NeoBERTForMaskedLM

    run = load_config(ckpt / "config.yaml")
    tokenizer = build_tokenizer(run)
    vocab = run.model.vocab_size or len(tokenizer)
    with torch.random.fork_rng(devices=[]):
        model = NeoBERTForMaskedLM(run.model.neobert_config(vocab_size=vocab, pad_token_id=tokenizer.pad_token_id))
    result = model.load_state_dict(_checkpoint_state_dict(ckpt), strict=False)
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]  # the tied decoder is stored once
    if missing or result.unexpected_keys:
        raise EvalError(f"the weights in {ckpt} do not match model.* of its config.yaml "
                        f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
    model.tie_weights()
    tmp = tempfile.TemporaryDirectory(prefix="neobert_ckpt_")
    model.save_pretrained(tmp.name)
    tokenizer.save_pretrained(tmp.name)
    match = _STEP.match(ckpt.name)
    logger.info("loaded checkpoint %s into %s", ckpt, tmp.name)
    return tmp, (int(match.group(1)) if match else None)


def checkpoint_results_dir(ckpt: Path) -> Path:
    """Where the results of a checkpoint go: ``RUN/eval/step_N`` (a sealed checkpoint is never modified)."""
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    return run_dir / "eval" / ckpt.name if run_dir else ckpt.parent / f"eval_{ckpt.name}"


def _from_checkpoint(spec: str, ckpt: Path, out: Path | None) -> ModelSource:
    tmp, step = materialize_checkpoint(ckpt)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    return ModelSource(spec, Path(tmp.name), out or checkpoint_results_dir(ckpt), run_dir=run_dir, step=step,
                       _tmp=tmp)


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise EvalError(f"no usable tokenizer in {model_dir} ({type(err).__name__}); save one next to the model "
                        "(the trainer writes it into final/)") from err
