"""QK-clip (Kimi K2): keep every attention head's largest pre-softmax logit at or below a threshold τ.

After an optimizer step, each head h with statistic ``s_h > τ`` gets ``η_h = τ / s_h``; its W_q rows are scaled by
``η_h**α`` and its W_k rows by ``η_h**(1-α)``, so every logit of that head scales by exactly ``η_h``. Values,
output projections and optimizer state are never touched, and heads with ``s_h ≤ τ`` are left bit-for-bit alone.

Decisions (evidence in docs/optimizers.md, section QK-clip):

* **Statistic measured after the update, by a layer-by-layer replay.** On clip steps the token ids (or the first
  layer's input) of every micro-batch are captured during the step's forward passes; ``after_step`` re-embeds them
  with the *updated* weights and replays the layers in order: layer l's q, k (after RoPE, exactly as the model
  computes them; the measuring pass stops inside ``qk_observer``) are measured on the output of the already-clipped
  layers < l, layer l is clipped, and its output feeds layer l+1. So a forward pass on that batch after the step has
  every head's max logit ≤ τ (eval mode). Cost per clip step: one no-grad encoder forward over the step's batch plus
  one extra QKV projection and a query-chunked T×T logit max per layer. Logging-only steps measure the cheaper
  forward-pass statistic (pre-update weights) instead.
* **Reduced across ranks before any weight moves.** Per layer, one ``all_reduce(MAX)`` (plus a ``SUM`` of row
  maxima and row counts for ``statistic="mean"``) gives every rank the same factors, so DDP replicas stay bit-identical and FSDP2
  ranks scale their own ``Shard(0)`` rows with the global row→head map (heads straddling shards included).
* **Rank-symmetric collectives.** Whether ``after_step`` communicates depends only on ``(step, logging)``, never on
  what a rank captured; steps that did not observe issue no collective at all.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from neobert_pt.optim.config import QKClipSettings

STATISTICS = ("max", "mean")
# Upper bound on elements of one (B, nH, chunk, T) logit tile: 2**25 fp32 = 128 MiB.
DEFAULT_CHUNK_ELEMENTS = 2**25


def is_clip_step(step: int, *, interval: int, warmup_steps: int) -> bool:
    """Clip at optimizer steps ``s ≥ warmup_steps`` with ``(s - warmup_steps) % interval == 0``."""
    return step >= warmup_steps and (step - warmup_steps) % interval == 0


def row_shard_range(num_rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, end)`` that ``rank`` owns under DTensor ``Shard(0)`` (``torch.chunk`` layout).

    Chunks are ``ceil(R / W)`` rows; trailing ranks get a short or empty chunk (R=9, W=4 → 3, 3, 3, 0).
    """
    chunk = math.ceil(num_rows / world_size) if num_rows else 0
    start = min(rank * chunk, num_rows)
    return start, min(start + chunk, num_rows)


@torch.no_grad()
def max_logit_per_row(
    q: torch.Tensor,
    k: torch.Tensor,
    allowed: torch.Tensor | None,
    *,
    scale: float,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Per (row, head) maximum of ``scale · q·kᵀ`` over allowed (query, key) pairs; ``-inf`` where none is allowed.

    ``q, k: (B, nH, T, d)``; ``allowed: (B, 1, T, T)`` bool or None (all pairs). Queries are processed in chunks so
    the logit tile never exceeds ``chunk_elements`` elements. Computed in fp32 whatever the input dtype.
    """
    b, nh, t, _ = q.shape
    q, k_t = q.float(), k.float().transpose(-1, -2)  # k_t (B, nH, d, T)
    chunk = max(1, min(t, chunk_elements // max(1, b * nh * t)))
    best = torch.full((b, nh), float("-inf"), dtype=torch.float32, device=q.device)
    for start in range(0, t, chunk):
        logits = torch.matmul(q[:, :, start : start + chunk], k_t) * scale  # (B, nH, c, T)
        if allowed is not None:
            logits = torch.where(allowed[:, :, start : start + chunk], logits, float("-inf"))
        best = torch.maximum(best, logits.amax(dim=(-1, -2)))
    return best


class _StopAttention(Exception):
    """Raised by the replay observer once q and k are measured: the rest of the attention is not needed."""


@dataclass
class _Plan:
    step: int
    clip: bool


class QKClip:
    """Per-head QK-clip shared by MuonClip and Dion2; works single-process, under DDP and on FSDP2 row shards.

    Trainer protocol, once per optimizer step (``step`` = the trainer's optimizer-step count, identical in both
    calls)::

        observe = qk_clip.wants_observation(step, logging)   # same answer on every rank
        for micro_batch in window:
            with qk_clip.observing(observe):
                loss = model(**micro_batch).loss; backward(loss)
        optimizer.step()
        metrics = qk_clip.after_step(step)                   # every rank; {} when nothing was observed

    Args:
        model: the unwrapped model (possibly FSDP2-sharded in place). Its attention modules expose ``qkv`` and
            ``qk_observer``; each sits directly in a layer whose ``forward(hidden_states, *rest)`` returns the next
            layer's ``hidden_states`` (first element of a tuple) with the same ``rest`` (NeoBERT's layer stack).
        threshold: τ, the cap on the per-head max logit ``q·k/√d``.
        alpha: share of the factor put on W_q (``η**alpha``); W_k gets ``η**(1 - alpha)``.
        interval, warmup_steps: clip schedule, see :func:`is_clip_step`.
        statistic: ``"max"`` — the head's max logit over the whole step's batch (Kimi K2, bounds every logit);
            ``"mean"`` — mean over batch rows of each row's max (fork parity; single rows may stay above τ).
        process_group: group over which data-parallel ranks reduce the statistic: a ``ProcessGroup`` (DDP), a 1-D
            ``DeviceMesh`` (FSDP2), or None: the qkv DTensor's mesh when sharded, else WORLD when
            torch.distributed is initialised with more than one rank, else no reduction.
        chunk_elements: size cap of one logit tile (memory knob; results do not depend on it).
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
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
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
        self.chunk_elements = int(chunk_elements)
        self.layers, self.attentions = _find_attention_layers(model)
        get_embeddings = getattr(model, "get_input_embeddings", None)
        embedding = get_embeddings() if callable(get_embeddings) else None
        self.embedding = embedding if isinstance(embedding, nn.Module) else None
        self._layer_of = {m: i for i, m in enumerate(self.attentions)}
        config = getattr(model, "config", None)
        first = self.attentions[0]
        self.num_heads = int(getattr(first, "num_heads", None) or config.num_attention_heads)
        self.head_dim = int(getattr(first, "head_dim", None) or config.hidden_size // self.num_heads)
        for attn in self.attentions:
            rows = attn.qkv.weight.shape[0]
            if rows != 3 * self.num_heads * self.head_dim:
                raise ValueError(
                    f"QKClip: qkv.weight has {rows} rows, expected 3 * {self.num_heads} heads * {self.head_dim}"
                )
        self._group = _resolve_group(process_group)
        self._plan: _Plan | None = None
        # One entry per micro-batch: the first layer's (args, kwargs) and the token ids it was embedded from (then
        # args[0] is dropped: the replay re-embeds with the updated embedding) or None (args[0] kept).
        self._captures: list[tuple[tuple, dict, torch.Tensor | None]] = []
        self._embedded: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids, output) of the last embedding call
        self._head_max: torch.Tensor | None = None  # (L, nH) fp32: max logit per head
        self._row_sum: torch.Tensor | None = None  # (L, nH + 1) fp64: Σ row maxima per head | number of rows

    # ------------------------------------------------------------------------------------------------------------
    # Trainer protocol
    # ------------------------------------------------------------------------------------------------------------

    @property
    def description(self) -> str:
        """One start-up log line with the settings."""
        return (f"qk-clip: tau={self.threshold:g} alpha={self.alpha:g} interval={self.interval} "
                f"warmup={self.warmup_steps} statistic={self.statistic}")

    def is_clip_step(self, step: int) -> bool:
        return is_clip_step(step, interval=self.interval, warmup_steps=self.warmup_steps)

    def wants_observation(self, step: int, logging: bool) -> bool:
        """Whether this step's forward passes must be observed (clip step, or a logging step); starts the step.

        Depends only on its arguments, so it is the same on every rank as long as ``logging`` is.
        """
        clip = self.is_clip_step(step)
        if not (clip or logging):
            self._discard()
            return False
        if self._plan is None or self._plan.step != step:
            self._discard()
            self._plan = _Plan(step=step, clip=clip)
            device = _local(self.attentions[0].qkv.weight).device
            layers = len(self.attentions)
            self._head_max = torch.full((layers, self.num_heads), float("-inf"), device=device)
            self._row_sum = torch.zeros((layers, self.num_heads + 1), dtype=torch.float64, device=device)
        return True

    @contextmanager
    def observing(self, enabled: bool) -> Iterator[None]:
        """Observe the forward passes run inside (one or all micro-batches of the step); no-op when disabled.

        Clip steps capture the first layer's inputs for the post-update replay; logging-only steps measure the
        per-head max logit directly in the forward pass (pre-update weights).
        """
        if not enabled:
            yield
            return
        if self._plan is None:
            raise RuntimeError("QKClip.observing(True) needs wants_observation(step, logging) to return True first")
        # The model builds the exact `allowed` mask only while an observer is installed, so capture mode installs a
        # no-op observer too.
        observer = _ignore if self._plan.clip else torch.compiler.disable(self._observe_forward)
        previous = [attn.qk_observer for attn in self.attentions]
        hooks = []
        try:
            for attn in self.attentions:
                attn.qk_observer = observer
            if self._plan.clip:
                hooks.append(self.layers[0].register_forward_pre_hook(self._capture, with_kwargs=True))
                if self.embedding is not None:
                    hooks.append(self.embedding.register_forward_hook(self._remember_embedding))
            yield
        finally:
            for attn, prev in zip(self.attentions, previous, strict=True):
                attn.qk_observer = prev
            for hook in hooks:
                hook.remove()
            self._embedded = None

    @torch.no_grad()
    def after_step(self, step: int) -> dict[str, float]:
        """Reduce the statistic across ranks, clip on clip steps, and return the step's metrics.

        Call on every rank right after ``optimizer.step()``. Returns ``{}`` (and communicates nothing) when
        ``wants_observation`` did not ask for this step.
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
                for layer in range(len(self.attentions)):
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
    # Observation and replay
    # ------------------------------------------------------------------------------------------------------------

    def _observe_forward(self, module: nn.Module, q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor | None):
        if _in_backward():  # activation-checkpoint recomputation: the same q, k were already measured
            return
        self._accumulate(self._layer_of[module], q.detach(), k.detach(), allowed)

    def _remember_embedding(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._embedded = (args[0].detach(), output) if args and isinstance(args[0], torch.Tensor) else None

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # Kept until after_step (the memory cost of the recomputation): the token ids when the first layer's input is
        # exactly the embedding output (the replay then also sees the updated embedding), otherwise that (B, T, H)
        # input; plus the rotary/layout tensors every layer shares.
        if _in_backward():  # activation-checkpoint recomputation of a batch already captured
            return
        ids = None
        if self._embedded is not None and args and args[0] is self._embedded[1]:
            ids, args = self._embedded[0], (None, *args[1:])
        self._embedded = None
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        self._captures.append((args, kwargs, ids))

    def _accumulate(self, layer: int, q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor | None) -> None:
        per_row = max_logit_per_row(q, k, allowed, scale=q.shape[-1] ** -0.5, chunk_elements=self.chunk_elements)
        self._head_max[layer] = torch.maximum(self._head_max[layer], per_row.amax(dim=0).to(self._head_max))
        seen = torch.isfinite(per_row[:, :1])  # rows with at least one allowed pair
        # A mask instead of boolean indexing: no device-to-host sync inside the forward pass.
        self._row_sum[layer, :-1] += torch.where(seen, per_row.double(), 0.0).sum(dim=0)
        self._row_sum[layer, -1] += seen.sum()

    def _clip_layer_by_layer(self) -> torch.Tensor:
        """Replay the captured batch through the layers with the updated weights, clipping each layer in turn.

        Layer l is measured on hidden states produced by the already-clipped layers < l, so a forward pass on the
        same batch after the step has every head's max logit ≤ τ. Per layer and micro-batch: one QKV projection and
        logit max (the measuring replay stops inside the observer), then, if a later layer follows, one layer
        forward with the clipped weights. Under FSDP2 each layer's sharded params are gathered with
        ``full_tensor()`` (every rank, every layer, same order) and swapped in; no FSDP hook runs. Returns η (L, nH).
        """
        captured = [(args, kwargs) for args, kwargs, _ in self._captures]
        hidden = self._first_layer_inputs()
        eta = torch.ones_like(self._head_max, dtype=torch.float64)
        for layer_idx, (layer, attn) in enumerate(zip(self.layers, self.attentions, strict=True)):
            weight = attn.qkv.weight  # the live (possibly sharded) parameter, before any swap
            full = {n: p.full_tensor() for n, p in layer.named_parameters() if isinstance(p, DTensor)}
            with _swap_params(layer, full), _eval_mode(layer):
                hidden = [h.to(attn.qkv.weight.dtype) for h in hidden]  # e.g. bf16 activations under FSDP2 MP
                self._measure(layer, attn, layer_idx, hidden, captured)
                self._reduce(layer_idx)
                eta[layer_idx] = self._eta(layer_idx)
                factors = self._row_factors(eta[layer_idx])
                _scale_rows(*_local_rows(weight), factors)
                if isinstance(weight, DTensor):  # also the gathered copy that the next layer's input comes from
                    _scale_rows(attn.qkv.weight, 0, factors)
                if layer_idx + 1 < len(self.layers):
                    hidden = [_first(layer.forward(h, *a[1:], **kw)) for h, (a, kw) in zip(hidden, captured, strict=True)]
        self._captures = []
        return eta

    def _first_layer_inputs(self) -> list[torch.Tensor]:
        """Each micro-batch's first-layer input: re-embedded with the current embedding, or as captured."""
        emb = self.embedding
        full = {}
        if emb is not None:  # gathered on every rank whatever it captured: all ranks enter the same collectives
            full = {n: p.full_tensor() for n, p in emb.named_parameters() if isinstance(p, DTensor)}
        with _swap_params(emb, full) if emb is not None else nullcontext():
            return [args[0] if ids is None else emb.forward(ids) for args, _, ids in self._captures]

    def _measure(self, layer: nn.Module, attn: nn.Module, layer_idx: int, hidden: list, captured: list) -> None:
        previous, attn.qk_observer = attn.qk_observer, _measure_and_stop(self)
        try:
            for h, (args, kwargs) in zip(hidden, captured, strict=True):
                try:
                    layer.forward(h, *args[1:], **kwargs)
                except _StopAttention:
                    continue
                raise RuntimeError(f"QKClip: attention of layer {layer_idx} returned without calling qk_observer")
        finally:
            attn.qk_observer = previous

    # ------------------------------------------------------------------------------------------------------------
    # Reduction and factors
    # ------------------------------------------------------------------------------------------------------------

    def _reduction_group(self) -> Any:
        if self._group is not None:
            return self._group
        weight = self.attentions[0].qkv.weight
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
        self._captures = []
        self._head_max = self._row_sum = None


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def _find_attention_layers(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(layers, attentions) in forward order: every module with ``qkv`` and ``qk_observer``, and its parent."""
    attentions = [m for m in model.modules() if hasattr(m, "qkv") and hasattr(m, "qk_observer")]
    if not attentions:
        raise ValueError("QKClip: the model has no attention module with `qkv` and `qk_observer`")
    parent = {child: m for m in model.modules() for child in m.children()}
    return [parent[a] for a in attentions], attentions


def _resolve_group(process_group: Any) -> Any:
    if process_group is None:
        return None
    if hasattr(process_group, "get_group"):  # DeviceMesh
        if process_group.ndim != 1:
            raise ValueError("QKClip supports a 1-D DeviceMesh only")
        return process_group.get_group()
    return process_group


def _local(weight: torch.Tensor) -> torch.Tensor:
    return weight.to_local() if isinstance(weight, DTensor) else weight


def _local_rows(weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The tensor this rank may write in place and the first global row it holds."""
    if not isinstance(weight, DTensor):
        return weight.data, 0
    mesh, placements = weight.device_mesh, weight.placements
    if mesh.ndim != 1 or placements[0] not in (Shard(0), Replicate()):
        raise ValueError(f"QKClip supports qkv DTensors on a 1-D mesh with Shard(0) or Replicate, got {placements}")
    local = weight.to_local()
    if placements[0] == Replicate():
        return local, 0
    start, end = row_shard_range(weight.shape[0], mesh.size(), mesh.get_local_rank())
    if local.shape[0] != end - start:
        raise ValueError(f"QKClip: local qkv shard has {local.shape[0]} rows, expected {end - start}")
    return local, start


def _scale_rows(local: torch.Tensor, start: int, factors: torch.Tensor) -> None:
    """Multiply the rows of ``local`` (global rows ``start…``) by their factor; rows with factor 1 stay bitwise."""
    f = factors[start : start + local.shape[0]].to(local.device)
    rows = (f != 1).nonzero().squeeze(1)
    if rows.numel():
        scaled = local.index_select(0, rows).double() * f[rows, None]
        local.index_copy_(0, rows, scaled.to(local.dtype))


@contextmanager
def _swap_params(module: nn.Module, replacements: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily put plain tensors in place of (sharded) parameters, by dotted name."""
    saved = []
    try:
        for name, tensor in replacements.items():
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            saved.append((owner, attr, owner._parameters[attr]))
            owner._parameters[attr] = tensor
        yield
    finally:
        for owner, attr, param in reversed(saved):
            owner._parameters[attr] = param


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


def _in_backward() -> bool:
    """True while autograd runs a backward pass (where activation checkpointing re-runs forwards)."""
    return torch._C._current_graph_task_id() != -1


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _ignore(module: nn.Module, q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor | None) -> None:
    """Observer installed on clip steps: its presence makes the model build the exact ``allowed`` mask."""


def _measure_and_stop(clip: QKClip):
    def observer(module: nn.Module, q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor | None) -> None:
        clip._accumulate(clip._layer_of[module], q, k, allowed)
        raise _StopAttention

    return observer


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
