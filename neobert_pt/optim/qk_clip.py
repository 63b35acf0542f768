"""QK-clip (Kimi K2): keep every attention head's largest pre-softmax logit at or below a threshold τ.

After an optimizer step, each head h with statistic ``s_h > τ`` gets ``η_h = τ / s_h``; its W_q rows are scaled by
``η_h**α`` and its W_k rows by ``η_h**(1-α)``, so every logit of that head scales by exactly ``η_h``. Values,
output projections and optimizer state are never touched, and heads with ``s_h ≤ τ`` are left bit-for-bit alone.

QK-clip is a trainer step hook over the model's QK-logit API (modeling_neobert.py): ``model(...,
output_qk_logits=True)`` returns each layer's per-row, per-head max pre-softmax logit, and
``layer(hidden, rotary, layout, measure_qk_logits=True)`` returns just that statistic for one layer (a plain early
return, no attention or MLP). Nothing in the model is patched; every layer is called as a module, so FSDP2's hooks
gather and free its parameters.

Decisions (evidence in docs/optimizers.md, section QK-clip):

* **Statistic measured after the update, by a layer-by-layer replay.** On clip steps the model inputs of every
  micro-batch are recorded; ``after_step`` rebuilds the first layer's input with the *updated* embedding
  (``layer_inputs``) and replays the layers in order: layer l's statistic (``measure_qk_logits``, the model's own q,
  k after RoPE) is measured on the output of the already-clipped layers < l, layer l is clipped, and its output
  feeds layer l+1. So a forward pass on that batch after the step has every head's max logit ≤ τ (eval mode). Cost
  per clip step: one no-grad encoder forward over the step's batch plus one extra QKV projection and a
  query-chunked T×T logit max per layer. Logging-only steps measure the cheaper forward-pass statistic (pre-update
  weights, ``output_qk_logits``) instead.
* **Reduced across ranks before any weight moves.** Per layer, one ``all_reduce(MAX)`` (plus a ``SUM`` of row
  maxima and row counts for ``statistic="mean"``) gives every rank the same factors, so DDP replicas stay
  bit-identical and FSDP2 ranks scale their own ``Shard(0)`` rows with the global row→head map (heads straddling
  shards included).
* **Rank-symmetric collectives.** Whether ``after_step`` communicates depends only on ``(step, logging)``, never on
  what a rank recorded; steps that did not observe issue no collective at all. The replay's FSDP2 gathers follow the
  number of recorded micro-batches, which is the accumulation window on every rank.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from neobert_pt.optim.config import QKClipSettings
from neobert_pt.optim.orthonormal import local, row_shard_range

STATISTICS = ("max", "mean")


def is_clip_step(step: int, *, interval: int, warmup_steps: int) -> bool:
    """Clip at optimizer steps ``s ≥ warmup_steps`` with ``(s - warmup_steps) % interval == 0``."""
    return step >= warmup_steps and (step - warmup_steps) % interval == 0


@dataclass
class _Plan:
    step: int
    clip: bool


class QKClip:
    """Per-head QK-clip shared by MuonClip and Dion2; works single-process, under DDP and on FSDP2 row shards.

    A trainer step hook, once per optimizer step (``step`` = the trainer's optimizer-step count, identical in every
    call)::

        forward_kwargs = qk_clip.begin_step(step, logging)   # same on every rank: {} or {"output_qk_logits": True}
        for micro_batch in window:
            out = model(**micro_batch, **forward_kwargs); backward(out.loss)
            qk_clip.record(micro_batch, out)                 # no-op on steps that do not observe
        optimizer.step()
        metrics = qk_clip.after_step(step)                   # every rank; {} when nothing was observed

    Args:
        model: the unwrapped model (possibly FSDP2-sharded in place). It, or its ``base_model``, is an encoder with
            ``layers`` (each with ``attention.qkv``, rows ``[Q heads | K heads | V heads]``) and ``layer_inputs(**
            model inputs) -> (hidden, rotary, layout)``; each layer is called as ``layer(hidden, rotary, layout,
            measure_qk_logits=True) -> (None, None, (B, nH) logits)`` and ``layer(hidden, rotary, layout)[0]`` is the
            next layer's input; the forward accepts ``output_qk_logits`` (NeoBERT's QK-logit API).
        threshold: τ, the cap on the per-head max logit ``q·k/√d``.
        alpha: share of the factor put on W_q (``η**alpha``); W_k gets ``η**(1 - alpha)``.
        interval, warmup_steps: clip schedule, see :func:`is_clip_step`.
        statistic: ``"max"`` — the head's max logit over the whole step's batch (Kimi K2, bounds every logit);
            ``"mean"`` — mean over batch rows of each row's max (fork parity; single rows may stay above τ).
        process_group: group over which data-parallel ranks reduce the statistic: a ``ProcessGroup`` (DDP), a 1-D
            ``DeviceMesh`` (FSDP2), or None: the qkv DTensor's mesh when sharded, else WORLD when
            torch.distributed is initialised with more than one rank, else no reduction.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        threshold: float,
        alpha: float,
        interval: int,
        warmup_steps: int,
        statistic: str = "max",
        process_group: Any = None,
    ) -> None:
        if not threshold > 0:
            raise ValueError(f"QKClip threshold must be > 0, got {threshold}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"QKClip alpha must be in [0, 1], got {alpha}")
        if interval < 1:
            raise ValueError(f"QKClip interval must be >= 1, got {interval}")
        if warmup_steps < 0:
            raise ValueError(f"QKClip warmup_steps must be >= 0, got {warmup_steps}")
        if statistic not in STATISTICS:
            raise ValueError(f"QKClip statistic must be one of {STATISTICS}, got {statistic!r}")
        self.threshold = float(threshold)
        self.alpha = float(alpha)
        self.interval = int(interval)
        self.warmup_steps = int(warmup_steps)
        self.statistic = statistic
        self.encoder = _find_encoder(model)
        self.layers = list(self.encoder.layers)
        # The model inputs that rebuild the first layer's input (the rest of a micro-batch, labels etc., is not kept).
        flags = {"output_attentions", "output_qk_logits"}
        self._input_keys = tuple(k for k in inspect.signature(self.encoder.layer_inputs).parameters if k not in flags)
        self.model = model
        first = self.layers[0].attention
        self.num_heads, self.head_dim = int(first.num_heads), int(first.head_dim)
        for layer in self.layers:
            rows = layer.attention.qkv.weight.shape[0]
            if rows != 3 * self.num_heads * self.head_dim:
                raise ValueError(
                    f"QKClip: qkv.weight has {rows} rows, expected 3 * {self.num_heads} heads * {self.head_dim}"
                )
        self._group = _resolve_group(process_group)
        self._plan: _Plan | None = None
        self._batches: list[dict[str, Any]] = []  # clip steps: each micro-batch's model inputs, until after_step
        self._head_max: torch.Tensor | None = None  # (L, nH) fp32: max logit per head
        self._row_sum: torch.Tensor | None = None  # (L, nH + 1) fp64: Σ row maxima per head | number of rows

    # ------------------------------------------------------------------------------------------------------------
    # Trainer step hook
    # ------------------------------------------------------------------------------------------------------------

    @property
    def description(self) -> str:
        """One start-up log line with the settings."""
        return (f"qk-clip: tau={self.threshold:g} alpha={self.alpha:g} interval={self.interval} "
                f"warmup={self.warmup_steps} statistic={self.statistic}")

    def is_clip_step(self, step: int) -> bool:
        return is_clip_step(step, interval=self.interval, warmup_steps=self.warmup_steps)

    def observes(self, step: int, logging: bool) -> bool:
        """Whether step ``step`` is observed: a clip step, or a logging step (pure; same on every rank)."""
        return logging or self.is_clip_step(step)

    def begin_step(self, step: int, logging: bool) -> dict[str, bool]:
        """Start step ``step``; returns the keyword arguments its forward passes take.

        ``{"output_qk_logits": True}`` on a logging step that does not clip (the forward pass measures, pre-update
        weights); ``{}`` otherwise (clip steps measure after the update, in ``after_step``). Depends only on its
        arguments, so it is the same on every rank as long as ``logging`` is.
        """
        self._discard()
        if not self.observes(step, logging):
            return {}
        self._plan = _Plan(step=step, clip=self.is_clip_step(step))
        device = local(self.layers[0].attention.qkv.weight).device
        layers = len(self.layers)
        self._head_max = torch.full((layers, self.num_heads), float("-inf"), device=device)
        self._row_sum = torch.zeros((layers, self.num_heads + 1), dtype=torch.float64, device=device)
        return {} if self._plan.clip else {"output_qk_logits": True}

    def record(self, batch: Mapping[str, Any], output: Any) -> None:
        """Take one micro-batch of the step: its model inputs (clip steps) or ``output.qk_logits`` (logging steps).

        Call after each forward of the step with the micro-batch the model received and what it returned; a no-op on
        steps that ``begin_step`` did not start.
        """
        plan = self._plan
        if plan is None:
            return
        if plan.clip:
            self._batches.append({k: _detached(batch[k]) for k in self._input_keys if k in batch})
            return
        qk_logits = getattr(output, "qk_logits", None)
        if qk_logits is None:
            raise ValueError("QKClip.record: the model output has no qk_logits; call the model with the keyword "
                             "arguments that QKClip.begin_step returned")
        for layer, per_row in enumerate(qk_logits):
            self._accumulate(layer, per_row.detach())

    @torch.no_grad()
    def after_step(self, step: int) -> dict[str, float]:
        """Reduce the statistic across ranks, clip on clip steps, and return the step's metrics.

        Call on every rank right after ``optimizer.step()``. Returns ``{}`` (and communicates nothing) when
        ``begin_step`` did not start an observed step.
        """
        plan = self._plan
        if plan is None:
            return {}
        if plan.step != step:
            raise ValueError(f"QKClip.after_step({step}) but the observed step was {plan.step}")
        try:
            if plan.clip:
                eta = self._clip_layer_by_layer()
            else:
                for layer in range(len(self.layers)):
                    self._reduce(layer)
            # The step's one host copy (statistic, and η on clip steps); the metrics are computed from it on the host.
            layers = self._head_max.shape[0]
            device_values = torch.cat([self._head_max.double(), eta]) if plan.clip else self._head_max.double()
            host = device_values.cpu()
            head_max = host[:layers]
            # Whether anything was observed anywhere (identical on every rank after the reduce).
            if not bool(torch.isfinite(head_max).any()):
                return {}
            metrics = {"train/max_attention_logit": head_max.max().item()}
            for i, value in enumerate(head_max.amax(dim=1).tolist()):
                metrics[f"train/max_attention_logit/layer_{i}"] = value
            if plan.clip:
                eta_host = host[layers:]
                # q and k of a clipped head both scale, so every logit of head h (its max included) scales by η_h.
                metrics["train/max_attention_logit_post_clip"] = (head_max * eta_host).max().item()
                metrics["train/qk_clip_heads_clipped"] = float((eta_host < 1).sum().item())
            return metrics
        finally:
            self._discard()

    # ------------------------------------------------------------------------------------------------------------
    # Statistic and replay
    # ------------------------------------------------------------------------------------------------------------

    def _accumulate(self, layer: int, per_row: torch.Tensor) -> None:
        """Fold one micro-batch's ``(B, nH)`` row maxima of layer ``layer`` into the step's statistic."""
        per_row = per_row.to(self._head_max.device)
        self._head_max[layer] = torch.maximum(self._head_max[layer], per_row.amax(dim=0).to(self._head_max))
        seen = torch.isfinite(per_row[:, :1])  # rows with at least one allowed pair
        # A mask instead of boolean indexing: no device-to-host sync inside the step.
        self._row_sum[layer, :-1] += torch.where(seen, per_row.double(), 0.0).sum(dim=0)
        self._row_sum[layer, -1] += seen.sum()

    def _clip_layer_by_layer(self) -> torch.Tensor:
        """Replay the recorded batch through the layers with the updated weights, clipping each layer in turn.

        Layer l is measured on hidden states produced by the already-clipped layers < l, so a forward pass on the
        same batch after the step has every head's max logit ≤ τ. Per layer and micro-batch: one call that stops
        once the logits are measured (QKV projection and logit max), then, if a later layer follows, one full layer
        call with the clipped weights. Every call goes through ``layer(...)``: under FSDP2 the layer's hooks gather
        its parameters for each call, every rank in the same order (ranks record equally many micro-batches).
        Returns η (L, nH).
        """
        # The FSDP2 units owning the embedding and each layer (None when unsharded), looked up now: the model may
        # have been sharded after this QKClip was built.
        parents = {child: m for m in self.model.modules() for child in m.children()}
        units = [_fsdp_unit(layer, parents) for layer in self.layers]
        embedding = self.encoder.get_input_embeddings()
        embedding_unit = _fsdp_unit(embedding, parents)
        # embedding.forward without hooks (_embedded): torch 2.11's grouped fully_shard skips the group's next
        # pre-forward (its all-gather) after a lone hooked call of one of its modules.
        with _gathered(embedding_unit, hooked=False):
            inputs = [self.encoder.layer_inputs(**_embedded(batch, embedding), output_qk_logits=True)
                      for batch in self._batches]
        hidden = [h for h, _, _ in inputs]
        shared = [(rotary, layout) for _, rotary, layout in inputs]  # the same for every layer
        eta = torch.ones_like(self._head_max, dtype=torch.float64)
        for idx, (layer, unit) in enumerate(zip(self.layers, units, strict=True)):
            hooked = unit is layer
            with _eval_mode(layer):
                for h, (rotary, layout) in zip(hidden, shared, strict=True):
                    with _gathered(unit, hooked):
                        _, _, per_row = layer(h, rotary, layout, measure_qk_logits=True)
                    self._accumulate(idx, per_row)
                self._reduce(idx)
                eta[idx] = self._eta(idx)
                _scale_rows(*_local_rows(layer.attention.qkv.weight), self._row_factors(eta[idx]))
                if idx + 1 < len(self.layers):
                    with _gathered(unit, hooked):
                        hidden = [layer(h, *ctx)[0] for h, ctx in zip(hidden, shared, strict=True)]
        self._batches = []
        return eta

    # ------------------------------------------------------------------------------------------------------------
    # Reduction and factors
    # ------------------------------------------------------------------------------------------------------------

    def _reduction_group(self) -> Any:
        if self._group is not None:
            return self._group
        weight = self.layers[0].attention.qkv.weight
        if isinstance(weight, DTensor):
            return weight.device_mesh.get_group()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.group.WORLD
        return None

    def _reduce(self, layer: int) -> None:
        """Make layer ``layer``'s statistic global: every rank gets the same values (collective on every rank)."""
        group = self._reduction_group()
        if group is None:
            return
        head_max = self._head_max[layer].clone()
        dist.all_reduce(head_max, op=dist.ReduceOp.MAX, group=group)
        self._head_max[layer] = head_max
        if self.statistic == "mean":
            row_sum = self._row_sum[layer].clone()
            dist.all_reduce(row_sum, op=dist.ReduceOp.SUM, group=group)
            self._row_sum[layer] = row_sum

    def _eta(self, layer: int) -> torch.Tensor:
        """(nH,) fp64 η_h = τ / s_h where s_h > τ, else 1."""
        if self.statistic == "max":
            stat = self._head_max[layer].double()
        else:
            stat = self._row_sum[layer, :-1] / self._row_sum[layer, -1].clamp(min=1)
        return torch.where(stat > self.threshold, self.threshold / stat, torch.ones_like(stat))

    def _row_factors(self, eta: torch.Tensor) -> torch.Tensor:
        """(3H,) fp64 factor per qkv row: η**α on the Q rows, η**(1-α) on the K rows, 1 on the V rows."""
        q_rows = (eta**self.alpha).repeat_interleave(self.head_dim)
        k_rows = (eta ** (1.0 - self.alpha)).repeat_interleave(self.head_dim)
        return torch.cat([q_rows, k_rows, torch.ones_like(q_rows)])

    def _discard(self) -> None:
        self._plan = None
        self._batches = []
        self._head_max = self._row_sum = None


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def _find_encoder(model: nn.Module) -> nn.Module:
    """The module with ``layers`` and ``layer_inputs``: ``model`` itself or its HF ``base_model``."""
    for candidate in (model, getattr(model, "base_model", None)):
        if candidate is not None and hasattr(candidate, "layers") and callable(getattr(candidate, "layer_inputs", None)):
            return candidate
    raise ValueError(f"QKClip: {type(model).__name__} exposes no encoder with `layers` and `layer_inputs` "
                     "(NeoBERT's QK-logit API, neobert_pt/modeling/modeling_neobert.py)")


def _fsdp_unit(module: nn.Module, parents: dict[nn.Module, nn.Module]) -> nn.Module | None:
    """The FSDP2 unit (``fully_shard``-ed module) that owns ``module``'s parameters: itself or its nearest such
    ancestor; None when the model is not FSDP2-sharded."""
    if not dist.is_available():
        return None
    from torch.distributed.fsdp import FSDPModule

    while module is not None and not isinstance(module, FSDPModule):
        module = parents.get(module)
    return module


@contextmanager
def _gathered(unit: nn.Module | None, hooked: bool) -> Iterator[None]:
    """Full parameters for calls into ``unit``'s modules, sharded again afterwards (FSDP2's public API).

    ``hooked``: the calls enter ``unit`` itself through ``__call__``, so its pre-forward hook gathers; only the
    final ``reshard()`` is needed (it also frees a unit built with ``reshard_after_forward=False``, whose stale
    gathered copy would otherwise hide the clipped rows). Otherwise ``unshard()`` gathers first. No-op unsharded.
    """
    if unit is None:
        yield
        return
    if not hooked:
        unit.unshard()
    try:
        yield
    finally:
        unit.reshard()


def _embedded(batch: Mapping[str, Any], embedding: nn.Module) -> Mapping[str, Any]:
    """``batch`` with its ``input_ids`` embedded by ``embedding.forward``: the embedding's FSDP2 hooks do not fire.

    The embedding shares its FSDP2 unit with the final norm and the decoder (neobert_pt/train/distributed.py). A
    call of the embedding alone through its hooks leaves that group's forward unfinished: torch 2.11's grouped
    ``fully_shard`` then skips the group's pre-forward (the all-gather) in the next training forward.
    """
    ids = batch.get("input_ids")
    if ids is None:
        return batch
    return {**batch, "input_ids": None, "inputs_embeds": embedding.forward(ids)}


def _detached(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


def _resolve_group(process_group: Any) -> Any:
    if process_group is None:
        return None
    if hasattr(process_group, "get_group"):  # DeviceMesh
        if process_group.ndim != 1:
            raise ValueError("QKClip supports a 1-D DeviceMesh only")
        return process_group.get_group()
    return process_group


def _local_rows(weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The tensor this rank may write in place and the first global row it holds."""
    if not isinstance(weight, DTensor):
        return weight.detach(), 0
    mesh, placements = weight.device_mesh, weight.placements
    if mesh.ndim != 1 or placements[0] not in (Shard(0), Replicate()):
        raise ValueError(f"QKClip supports qkv DTensors on a 1-D mesh with Shard(0) or Replicate, got {placements}")
    shard = local(weight)
    if placements[0] == Replicate():
        return shard, 0
    start, end = row_shard_range(weight.shape[0], mesh.size(), mesh.get_local_rank())
    if shard.shape[0] != end - start:
        raise ValueError(f"QKClip: local qkv shard has {shard.shape[0]} rows, expected {end - start}")
    return shard, start


def _scale_rows(shard: torch.Tensor, start: int, factors: torch.Tensor) -> None:
    """Multiply the rows of ``shard`` (global rows ``start…``) by their factor; rows with factor 1 stay bitwise."""
    f = factors[start : start + shard.shape[0]].to(shard.device)
    rows = (f != 1).nonzero().squeeze(1)
    if rows.numel():
        scaled = shard.index_select(0, rows).double() * f[rows, None]
        shard.index_copy_(0, rows, scaled.to(shard.dtype))


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """No dropout during the replay; the training flags are restored afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def build_qk_clip(model: nn.Module, settings: QKClipSettings, distributed_mesh: Any = None) -> QKClip | None:
    """The QK-clip component an optimizer builder returns, or None when ``settings.enable_clipping`` is off.

    ``distributed_mesh`` is what the builder received: None, a DDP ``ProcessGroup`` or an FSDP2 1-D ``DeviceMesh``.
    """
    if not settings.enable_clipping:
        return None
    process_group = distributed_mesh.get_group() if hasattr(distributed_mesh, "get_group") else distributed_mesh
    if process_group is not None and dist.get_world_size(process_group) < dist.get_world_size():
        process_group = dist.group.WORLD  # HSDP: the shard sub-mesh; the statistic spans every replica's batch
    return QKClip(
        model,
        threshold=settings.clipping_threshold,
        alpha=settings.clipping_alpha,
        interval=settings.clipping_interval,
        warmup_steps=settings.clipping_warmup_steps,
        statistic=settings.clipping_statistic,
        process_group=process_group,
    )
