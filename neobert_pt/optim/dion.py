"""Dion (v1): low-rank orthonormal updates by one warm-started power iteration, with error feedback
(``docs/specs/dion.md``).

Per matrix ``W`` (m×n) and step, with momentum ``M`` and right factor ``Q`` (``(short side, r)`` unsharded):

    B = M + G;  P = orth(A·Q);  R = Aᵀ·P;  M ← B − (1−μ)·P Rᵀ;  Q ← colnorm(R);  W ← (1−ηλ)·W − η·sqrt(m/n)·P Qᵀ

where ``A = B`` (tall or square) or ``Bᵀ`` (wide; FSDP2 ``Shard(0)`` always uses this "transposed" orientation so
P's rows are never split). ``orth`` is randomized Cholesky QR (RCQR), Householder QR when P is square or wide.
Scalar params (embeddings, norms, biases, heads) are stepped by AdamW or Lion in the same optimizer (``algorithm``);
AdamW and Lion are the shared :mod:`neobert_pt.optim.scalar_opts` steps (AdamW: torch's public fused functional,
with the group step as t). Mesh resolution, local shards, row ranges and the LR adjustment are the shared ones of
:mod:`neobert_pt.optim.orthonormal`.

Distribution (docs/specs/dion.md §2), all with ordinary collectives through :class:`~neobert_pt.optim.comm.CommCounter`:

* ``outer_shard_mesh`` (FSDP2 ``Shard(0)`` DTensors, 1-D mesh or the shard dim of a 2-D HSDP mesh): the partial
  ``P = Σ_j B_jᵀ Q_j`` and the column sums of squares are summed over the shard axis; every shard rank then
  orthonormalises the same P with the same sketch.
* ``replicate_mesh`` (DDP ``ProcessGroup`` or the replicate dim of an HSDP mesh) with
  ``replicate_mesh_grad_sync=True``: gradients are NOT reduced by the framework. When it saves bytes
  (``(m+n)·r < m·n``) Dion averages only ``P`` (before orthonormalisation) and ``R`` over the replicate axis
  (compressed sync, the PowerSGD idea); otherwise, and for scalar params, it averages the gradient. The weights
  stay identical across replicas; the momenta differ, and their mean is the one-process momentum
  (:meth:`Dion.synchronize_for_checkpoint` replaces each by the mean). With ``False`` the framework has already
  averaged the gradients and nothing is reduced over the replicate axis.

Unlike upstream ``dion.Dion`` (docs/specs/dion.md §5): the compressed-sync decision is made from (shape, rank, mesh) on
every step, never from "state was just created", so it survives ``load_state_dict``; the RCQR sketch and the initial Q
come from generators seeded by (``sketch_seed``, step, param index), never from the global RNG, so replicas agree
without communication and a resume is bit-exact without saving RNG state; a per-group ``betas`` is mapped to
``beta1``/``beta2``; ``load_state_dict`` keeps bf16 states bf16 and re-initialises a Q whose shape does not fit the
current layout (warm start lost, logged once). State is created for every param at construction (DCP needs the
same keys on every rank); an existing ``momentum``/``Q`` (e.g. an upstream state dict) is used as is.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from neobert_pt.config.errors import ConfigError
from neobert_pt.optim.comm import CommCounter
from neobert_pt.optim.orthonormal import adjusted_lr_factor, local, local_rows, resolve_mesh
from neobert_pt.optim.registry import BuiltOptimizer, OptimizerContext
from neobert_pt.optim.scalar_opts import adamw_step, f32, lion_step

logger = logging.getLogger(__name__)

ALGORITHMS = ("dion", "adamw", "lion")
QR_METHODS = ("rcqr", "qr", "cqr")
_MASK63 = (1 << 63) - 1


@dataclass
class DionMixedPrecisionConfig:
    """State dtypes; ``None`` means the param dtype. ``momentum_dtype`` covers Dion's M and AdamW/Lion momenta."""

    momentum_dtype: torch.dtype | None = None
    Q_dtype: torch.dtype | None = None  # noqa: N815 (upstream's name)
    variance_dtype: torch.dtype | None = None


def dion_rank(rank_fraction: float, rank_multiple_of: int, m: int, n: int) -> int:
    """``r = min(k·ceil(f·min(m,n)/k), m, n)`` in IEEE double exactly as written (``0.28·25 → 8``,
    docs/specs/dion.md §1.4)."""
    r = rank_fraction * min(m, n)
    r = rank_multiple_of * math.ceil(r / rank_multiple_of)
    return min(r, m, n)


def compressed_sync_saves(m: int, n: int, r: int) -> bool:
    """Whether syncing the factors ``(m+n)·r`` moves fewer elements than the gradient ``m·n``
    (docs/specs/dion.md §2.7)."""
    return (m + n) * r < m * n


def _seed(*parts: int) -> int:
    """A 63-bit seed mixed from small integers (splitmix-style; identical on every rank and every run)."""
    x = 0x9E3779B97F4A7C15
    for part in parts:
        x = (x ^ (part & _MASK63)) * 0xBF58476D1CE4E5B9 & _MASK63
        x ^= x >> 31
    return x & _MASK63


@dataclass
class _Layout:
    """How one Dion param is laid out: orientation and the process group its row shards are spread over."""

    transposed: bool
    shard_group: Any = None  # FSDP2 shard axis (None: unsharded)
    shard_rank: int = 0
    shard_world: int = 1


class Dion(torch.optim.Optimizer):
    """Dion + AdamW/Lion scalar groups; constructor-compatible with upstream ``dion.Dion`` (single-process args).

    Extra arguments: ``sketch_seed`` (seeds the per-(step, param) RCQR sketch and the initial Q). ``qr_method``
    ``"qr"``/``"cqr"`` and ``power_iters > 1`` behave as upstream ``DionReference``. ``inner_shard_mesh`` (tensor
    parallelism) is not supported. Group keys: upstream's, plus ``betas`` (mapped) and ``name`` (a label).
    """

    def __init__(
        self,
        params: Iterable[Any],
        replicate_mesh: Any = None,
        outer_shard_mesh: DeviceMesh | None = None,
        inner_shard_mesh: DeviceMesh | None = None,
        replicate_mesh_grad_sync: bool = True,
        rank_fraction: float = 1.0,
        rank_multiple_of: int = 1,
        lr: float = 0.01,
        mu: float = 0.95,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.01,
        epsilon: float = 1e-8,
        power_iters: int = 1,
        qr_method: str = "rcqr",
        cqr_warmup_steps: int = 150,
        rcqr_oversample: float = 1.25,
        mixed_precision_config: DionMixedPrecisionConfig | None = None,
        sketch_seed: int = 0,
    ) -> None:
        if inner_shard_mesh is not None:
            raise NotImplementedError("Dion: inner_shard_mesh (tensor parallelism) is not supported")
        if qr_method not in QR_METHODS:
            raise ValueError(f"Dion: unknown qr_method {qr_method!r}; valid: {', '.join(QR_METHODS)}")
        if int(power_iters) != power_iters or power_iters < 1:
            raise ValueError(f"Dion: power_iters must be an integer >= 1, got {power_iters}")
        if len(betas) != 2:
            raise ValueError(f"Dion: betas must have two values, got {betas}")
        self._replicate_group = resolve_mesh(replicate_mesh, "Dion", "replicate_mesh").group
        if outer_shard_mesh is not None:
            if not isinstance(outer_shard_mesh, DeviceMesh):
                raise TypeError(f"Dion: outer_shard_mesh must be a DeviceMesh, got {type(outer_shard_mesh).__name__}")
            if outer_shard_mesh.ndim != 1:
                raise ValueError(f"Dion: outer_shard_mesh must be 1-D, got {outer_shard_mesh.ndim}-D")
            if outer_shard_mesh is replicate_mesh:
                raise ValueError("Dion: outer_shard_mesh and replicate_mesh must be different meshes")
        self.outer_shard_mesh = outer_shard_mesh
        self.replicate_mesh_grad_sync = bool(replicate_mesh_grad_sync)
        self.power_iters = int(power_iters)
        self.qr_method = qr_method
        self.cqr_warmup_steps = int(cqr_warmup_steps)
        self.sketch_seed = int(sketch_seed)
        self.mixed_precision = mixed_precision_config or DionMixedPrecisionConfig()
        self.comm = CommCounter()  # per-step collectives (read and reset by the trainer)
        self.checkpoint_comm = CommCounter()  # synchronize_for_checkpoint, kept out of the per-step figures
        self._reinit_logged = False
        defaults = dict(
            rank_fraction=rank_fraction, rank_multiple_of=rank_multiple_of, lr=lr, mu=mu, beta1=betas[0],
            beta2=betas[1], weight_decay=weight_decay, epsilon=epsilon, oversample=rcqr_oversample,
            algorithm="dion", step=0,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                self._init_state(p, group)

    # ------------------------------------------------------------------------------------------- meshes/layout
    @property
    def replicate_world(self) -> int:
        return 1 if self._replicate_group is None else dist.get_world_size(self._replicate_group)

    @property
    def syncs_replicas(self) -> bool:
        """True when Dion itself averages over the replicate axis (the framework does not)."""
        return self.replicate_mesh_grad_sync and self.replicate_world > 1

    def _layout(self, p: Tensor) -> _Layout:
        """Orientation and shard group (docs/specs/dion.md §2.1): ``Shard(0)`` → transposed; unsharded → transposed iff
        m < n."""
        m, n = p.shape
        if not isinstance(p, DTensor):
            return _Layout(transposed=m < n)
        shards = [(d, pl) for d, pl in enumerate(p.placements) if pl.is_shard()]
        if not shards:
            return _Layout(transposed=m < n)
        if len(shards) > 1 or type(shards[0][1]) is not Shard or shards[0][1].dim % 2 != 0:
            raise NotImplementedError(f"Dion supports FSDP2 Shard(0) of 2-D matrices; got placements {p.placements}")
        mesh_dim = shards[0][0]
        group = p.device_mesh.get_group(mesh_dim)
        return _Layout(transposed=True, shard_group=group, shard_rank=p.device_mesh.get_local_rank(mesh_dim),
                       shard_world=dist.get_world_size(group))

    def is_compressed(self, p: Tensor) -> bool:
        """Whether this step syncs P and R instead of the gradient (re-derived every step, docs/specs/dion.md §5 item
        9)."""
        m, n = p.shape
        r = local(self.state[p]["Q"]).shape[1]
        return self.syncs_replicas and compressed_sync_saves(m, n, r)

    # ------------------------------------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Map ``betas`` to ``beta1``/``beta2`` (never silently ignored) and validate before use."""
        group = dict(param_group)
        if "betas" in group:
            betas = tuple(group.pop("betas"))
            if len(betas) != 2:
                raise ValueError(f"Dion: betas must have two values, got {betas}")
            group["beta1"], group["beta2"] = betas
        super().add_param_group(group)
        group = self.param_groups[-1]
        if group["algorithm"] not in ALGORITHMS:
            raise ValueError(f"Unknown algorithm {group['algorithm']!r}; valid: {', '.join(ALGORITHMS)}")
        for key in ("lr", "mu", "weight_decay"):
            if group[key] < 0:
                raise ValueError(f"Dion: {key} must be >= 0, got {group[key]}")
        if group["beta1"] < 0 or group["beta2"] < 0:
            raise ValueError(f"Dion: betas must be >= 0, got ({group['beta1']}, {group['beta2']})")
        if not 0 < group["rank_fraction"] <= 1:
            raise ValueError(f"Dion: rank_fraction must be in (0, 1], got {group['rank_fraction']}")
        if group["rank_multiple_of"] <= 0:
            raise ValueError(f"Dion: rank_multiple_of must be > 0, got {group['rank_multiple_of']}")
        if group["algorithm"] == "dion":
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Dion groups take 2-D matrices; got a tensor of shape {tuple(p.shape)} "
                                     "(put it in an 'adamw' or 'lion' group)")

    # ------------------------------------------------------------------------------------------------- state
    def _dtype(self, which: str, p: Tensor) -> torch.dtype:
        return getattr(self.mixed_precision, which) or p.dtype

    def _param_index(self) -> dict[int, int]:
        return {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}

    def _initial_q(self, p: Tensor, group: dict[str, Any], index: int) -> Tensor:
        """Standard-normal Q from a generator seeded by (sketch_seed, param index), drawn on the full shape;
        a sharded param keeps its own rows (FSDP2's ``torch.chunk`` layout)."""
        m, n = p.shape
        layout = self._layout(p)
        r = dion_rank(group["rank_fraction"], group["rank_multiple_of"], m, n)
        rows = m if layout.transposed else n
        gen = torch.Generator().manual_seed(_seed(self.sketch_seed, index, 0x51))
        full = torch.randn(rows, r, generator=gen).to(self._dtype("Q_dtype", p))
        if not isinstance(p, DTensor):
            return full.to(p.device)
        if layout.shard_group is not None:
            full = local_rows(full, layout.shard_world, layout.shard_rank)
        return DTensor.from_local(full.to(local(p).device).contiguous(), p.device_mesh, p.placements,
                                  run_check=False, shape=torch.Size((rows, r)), stride=(r, 1))

    def _init_state(self, p: Tensor, group: dict[str, Any], index: int | None = None) -> None:
        state = self.state[p]
        algorithm = group["algorithm"]
        if "momentum" not in state:
            state["momentum"] = torch.zeros_like(p, dtype=self._dtype("momentum_dtype", p))
        if algorithm == "dion" and "Q" not in state:
            index = self._param_index()[id(p)] if index is None else index
            state["Q"] = self._initial_q(p, group, index)
        if algorithm == "adamw" and "variance" not in state:
            state["variance"] = torch.zeros_like(p, dtype=self._dtype("variance_dtype", p))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load, then restore the configured state dtypes (torch casts to the param dtype) and re-initialise a Q
        whose shape does not fit this layout (a checkpoint from another orientation, docs/specs/dion.md §1.10)."""
        super().load_state_dict(state_dict)
        index = self._param_index()
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                self._init_state(p, group, index[id(p)])
                state["momentum"] = state["momentum"].to(self._dtype("momentum_dtype", p))
                if "variance" in state:
                    state["variance"] = state["variance"].to(self._dtype("variance_dtype", p))
                if group["algorithm"] != "dion":
                    continue
                q = state["Q"].to(self._dtype("Q_dtype", p))
                m, n = p.shape
                expected_rows = m if self._layout(p).transposed else n
                if q.ndim != 2 or q.shape[0] != expected_rows or q.shape[1] > min(m, n):
                    if not self._reinit_logged:
                        logger.warning("Dion: a loaded Q of shape %s does not fit this layout (expected %d rows); "
                                       "re-initialising Q (the power iteration loses its warm start)",
                                       tuple(q.shape), expected_rows)
                        self._reinit_logged = True
                    q = self._initial_q(p, group, index[id(p)])
                state["Q"] = q

    # -------------------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            group["step"] += 1
        if self.syncs_replicas:
            self._average_uncompressed_grads()
        index = self._param_index()
        for group in self.param_groups:
            if group["algorithm"] == "dion":
                for p in group["params"]:
                    if p.grad is not None:
                        self._dion_matrix(p, group, index[id(p)])
        for algorithm, fn in (("lion", self._step_lion), ("adamw", self._step_adamw)):
            for group in self.param_groups:
                if group["algorithm"] == algorithm:
                    fn(group)
        return loss

    def _average_uncompressed_grads(self) -> None:
        """Average over the replicate axis every gradient Dion does not compress (scalars, full-rank matrices)."""
        grads = [
            local(p.grad)
            for group in self.param_groups for p in group["params"]
            if p.grad is not None and not (group["algorithm"] == "dion" and self.is_compressed(p))
        ]
        self.comm.all_reduce_coalesced(grads, self._replicate_group, "replicate", average=True)

    def _dion_matrix(self, p: Tensor, group: dict[str, Any], index: int) -> None:
        """One Dion step of one matrix (docs/specs/dion.md §1.5; §2.3/§2.4 collectives where the layout needs them)."""
        state = self.state[p]
        layout = self._layout(p)
        compressed = self.is_compressed(p)
        m, n = p.shape
        w, g = local(p), local(p.grad)
        mom, q = local(state["momentum"]), local(state["Q"])
        mom.add_(g.to(mom.dtype))
        a = mom.T if layout.transposed else mom
        q_work = q.to(mom.dtype)
        r_mat = q_work
        for it in range(self.power_iters):
            p_mat = a @ r_mat
            if layout.shard_group is not None:
                self.comm.all_reduce(p_mat, layout.shard_group, "shard")
            if compressed:
                self.comm.all_reduce(p_mat, self._replicate_group, "replicate", average=True)
            p_mat = self._orthonormalize(p_mat, group, index, it)
            r_mat = a.T @ p_mat
            if compressed:
                self.comm.all_reduce(r_mat, self._replicate_group, "replicate", average=True)
        # All-zero guard without a host sync: P ← 0 and R ← Q̃ when B == 0, else NaN/inf cleaned
        # (docs/specs/dion.md §1.5 step 6).
        nonzero = (mom != 0).any()
        p_mat = torch.nan_to_num(p_mat) * nonzero.to(p_mat.dtype)
        r_mat = torch.where(nonzero, torch.nan_to_num(r_mat), q_work)
        mu = torch.tensor(group["mu"], dtype=torch.float32)
        feedback = r_mat @ p_mat.T if layout.transposed else p_mat @ r_mat.T
        mom.add_(feedback * -(1 - mu))
        r32 = r_mat.float()
        sumsq = r32.square().sum(dim=0, keepdim=True)
        if layout.shard_group is not None:
            self.comm.all_reduce(sumsq, layout.shard_group, "shard")
        q_new = (r32 / (sumsq.sqrt() + group["epsilon"])).to(r_mat.dtype)
        lr = torch.tensor(group["lr"], dtype=torch.float32)
        scaled_lr = lr * adjusted_lr_factor("spectral_norm", (m, n))
        direction = q_new @ p_mat.T if layout.transposed else p_mat @ q_new.T
        update = direction * -scaled_lr
        w.mul_(1 - lr * group["weight_decay"])
        w.add_(update)
        q.copy_(q_new)

    # -------------------------------------------------------------------------------------- orthonormalisation
    def _orthonormalize(self, p_mat: Tensor, group: dict[str, Any], index: int, iteration: int) -> Tensor:
        """``orth(P)`` in fp32, cast back to P's dtype, row-major (docs/specs/dion.md §1.6)."""
        rows, r = p_mat.shape
        if self.qr_method == "qr" or rows <= r:
            out = torch.linalg.qr(p_mat.float(), mode="reduced").Q
        elif self.qr_method == "cqr" and group["step"] > self.cqr_warmup_steps:
            out = self._cqr(p_mat, group, index, iteration)
        else:
            out = self._rcqr(p_mat, group, index, iteration)
        return out.to(p_mat.dtype).contiguous()

    def _sketch(self, p_mat: Tensor, group: dict[str, Any], index: int, iteration: int) -> Tensor:
        """Gaussian sketch ``(k, rows)``, ``N(0, 1/k)``, from a generator seeded by (seed, step, param, iteration)."""
        rows, r = p_mat.shape
        k = 128 * math.ceil(group["oversample"] * r / 128)
        gen = torch.Generator(device=p_mat.device)
        gen.manual_seed(_seed(self.sketch_seed, group["step"], index, iteration))
        sketch = torch.empty(k, rows, dtype=p_mat.dtype, device=p_mat.device)
        return sketch.normal_(std=math.sqrt(1.0 / k), generator=gen)

    def _rcqr(self, p_mat: Tensor, group: dict[str, Any], index: int, iteration: int) -> Tensor:
        sketch = self._sketch(p_mat, group, index, iteration)
        _, r1 = torch.linalg.qr((sketch @ p_mat).float(), mode="r")
        y = torch.linalg.solve_triangular(r1, p_mat.float(), upper=True, left=False)
        r2, _ = torch.linalg.cholesky_ex(y.T @ y, upper=True)
        return torch.linalg.solve_triangular(r2, y, upper=True, left=False)

    def _cqr(self, p_mat: Tensor, group: dict[str, Any], index: int, iteration: int) -> Tensor:
        """Cholesky QR, falling back to RCQR when the Cholesky fails (reads ``info``: one host sync)."""
        p32 = p_mat.float()
        r_chol, info = torch.linalg.cholesky_ex(p32.T @ p32, upper=True)
        if int(info) == 0:
            return torch.linalg.solve_triangular(r_chol, p32, upper=True, left=False)
        return self._rcqr(p_mat, group, index, iteration)

    # ------------------------------------------------------------------------------------------ scalar groups
    def _step_lion(self, group: dict[str, Any]) -> None:
        """Lion (the shared implementation: fp32 0-d scalars, upstream's op order; reproduces upstream Dion's Lion
        bit for bit on every fixture run, bf16 momenta included)."""
        params = [p for p in group["params"] if p.grad is not None]
        lion_step(
            [local(p) for p in params],
            [local(p.grad) for p in params],
            [local(self.state[p]["momentum"]) for p in params],
            lr=group["lr"], beta1=group["beta1"], beta2=group["beta2"], weight_decay=group["weight_decay"],
        )

    def _step_adamw(self, group: dict[str, Any]) -> None:
        """Decoupled AdamW with the GROUP step as t (docs/specs/dion.md §1.9): torch's fused kernel (public functional,
        Python-float lr as upstream) when all four dtypes agree; the per-element formula otherwise (mixed-precision
        states)."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        lr, wd, eps, beta1, beta2, t = (group[k] for k in ("lr", "weight_decay", "epsilon", "beta1", "beta2", "step"))
        fused, manual = [], []
        for p in params:
            s = self.state[p]
            same = s["momentum"].dtype == s["variance"].dtype == p.dtype == p.grad.dtype
            (fused if same else manual).append(p)
        # Counters at t−1: torch's functional increments them, so the kernel sees the group step t.
        adamw_step(
            [local(p) for p in fused],
            [local(p.grad) for p in fused],
            [local(self.state[p]["momentum"]) for p in fused],
            [local(self.state[p]["variance"]) for p in fused],
            [f32(t - 1, local(p).device) for p in fused],
            lr=lr, beta1=beta1, beta2=beta2, weight_decay=wd, eps=eps, tensor_lr=False,
        )
        bc1, bc2 = 1 - beta1**t, 1 - beta2**t
        for p in manual:
            w, g = local(p), local(p.grad).float()
            m, v = local(self.state[p]["momentum"]), local(self.state[p]["variance"])
            m.copy_(m.float().lerp(g, 1 - beta1))
            v.copy_(v.float().mul(beta2).addcmul(g, g, value=1 - beta2))
            w.mul_(1 - lr * wd)
            denom = v.float().sqrt().div(math.sqrt(bc2)).add(eps)
            w.add_((m.float() / denom).to(w.dtype), alpha=-lr / bc1)

    # ---------------------------------------------------------------------------------------- checkpointing
    @torch.no_grad()
    def synchronize_for_checkpoint(self) -> None:
        """Replace each replica's Dion momentum by the replica mean (= the one-process momentum,
        docs/specs/dion.md §2.4).

        Only needed with compressed sync over more than one replica (the momenta differ per replica there); a
        no-op otherwise. Every rank must call it. It does not change the future trajectory in exact arithmetic.
        """
        if not self.syncs_replicas:
            return
        momenta = [
            local(self.state[p]["momentum"])
            for group in self.param_groups if group["algorithm"] == "dion"
            for p in group["params"] if self.is_compressed(p)
        ]
        self.checkpoint_comm.all_reduce_coalesced(momenta, self._replicate_group, "replicate", average=True)




# ------------------------------------------------------------------------------------------------------ builder
_DTYPES = {"param": None, "bfloat16": torch.bfloat16, "float32": torch.float32}


def dion_replicate_sync(ctx: OptimizerContext) -> bool:
    """Whether Dion (not FSDP) averages over the replicate axis; refuses ``true`` without an HSDP mesh."""
    flag = ctx.config.dion_config.replicate_mesh_grad_sync
    hsdp = ctx.replicate_mesh is not None
    if flag and not hsdp and ctx.distributed_mesh is not None:
        kind = "an FSDP2 1-D mesh" if isinstance(ctx.distributed_mesh, DeviceMesh) else "DDP"
        raise ConfigError(
            f"optimizer.dion_config.replicate_mesh_grad_sync=true needs a 2-D (replicate x shard) HSDP mesh, but "
            f"this launch uses {kind}; launch with configs/accelerate/hsdp_*.yaml or set it to false or null"
        )
    return hsdp and flag is not False


def lm_head_lr_scale(scalar_algorithm: str, d_in: int) -> float:
    """Upstream's rule for an untied LM head: ``1/sqrt(d_in)`` under Lion, 1 under AdamW."""
    return 1.0 / math.sqrt(d_in) if scalar_algorithm == "lion" else 1.0


def build_dion(ctx: OptimizerContext) -> BuiltOptimizer:
    """Dion on the block matrices (fused QKV as one matrix), AdamW/Lion without decay on embeddings (= tied LM head),
    norms, biases and heads; an untied 2-D head gets its own scalar group with upstream's LR rule."""
    cfg, dc = ctx.config, ctx.config.dion_config
    matrix_lr = dc.matrix_lr if dc.matrix_lr is not None else ctx.peak_lr
    sync = dion_replicate_sync(ctx)
    groups: list[dict[str, Any]] = []
    log_lines: list[str] = []
    for spec in ctx.param_groups:
        if spec.kind == "matrix":
            groups.append({"params": spec.params, "name": spec.name, "algorithm": "dion", "lr": matrix_lr,
                           "weight_decay": cfg.weight_decay})
            log_lines.append(f"dion group {spec.name}: dion lr={matrix_lr:g} wd={cfg.weight_decay:g} "
                             f"rank_fraction={dc.rank_fraction:g} mu={dc.mu:g} {dc.qr_method}")
            continue
        heads = [p for p in spec.params if spec.name == "head" and p.ndim == 2 and dc.lm_head_lr_rule == "upstream"]
        rest = [p for p in spec.params if not any(p is h for h in heads)]
        for p in heads:
            lr = ctx.peak_lr * lm_head_lr_scale(dc.scalar_algorithm, p.shape[1])
            groups.append({"params": [p], "name": "head", "algorithm": dc.scalar_algorithm, "lr": lr,
                           "weight_decay": 0.0})
            log_lines.append(f"dion group head {tuple(p.shape)}: {dc.scalar_algorithm} lr={lr:g} wd=0")
        if rest:
            groups.append({"params": rest, "name": spec.name, "algorithm": dc.scalar_algorithm, "lr": ctx.peak_lr,
                           "weight_decay": 0.0})
            log_lines.append(f"dion group {spec.name}: {dc.scalar_algorithm} lr={ctx.peak_lr:g} wd=0")
    hsdp = ctx.replicate_mesh is not None
    replicate = ctx.replicate_mesh if hsdp else (
        ctx.distributed_mesh if isinstance(ctx.distributed_mesh, dist.ProcessGroup) else None)
    outer = ctx.shard_mesh if hsdp else (
        ctx.distributed_mesh if isinstance(ctx.distributed_mesh, DeviceMesh) else None)
    optimizer = Dion(
        groups, replicate_mesh=replicate, outer_shard_mesh=outer, replicate_mesh_grad_sync=sync,
        rank_fraction=dc.rank_fraction, rank_multiple_of=dc.rank_multiple_of, lr=matrix_lr, mu=dc.mu,
        betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, epsilon=cfg.eps, power_iters=dc.power_iters,
        qr_method=dc.qr_method, cqr_warmup_steps=dc.cqr_warmup_steps, rcqr_oversample=dc.rcqr_oversample,
        mixed_precision_config=DionMixedPrecisionConfig(
            _DTYPES[dc.momentum_dtype], _DTYPES[dc.q_dtype], _DTYPES[dc.variance_dtype]),
        sketch_seed=dc.sketch_seed,
    )
    if hsdp:
        how = ("Dion averages its P/R factors over the replicate axis, FSDP reduces over the shard axis"
               if sync else "FSDP averages full gradients over both axes")
        log_lines.append(f"dion on HSDP: {how}")
    return BuiltOptimizer(optimizer=optimizer, log_lines=log_lines)


__all__ = ["Dion", "DionMixedPrecisionConfig", "build_dion", "compressed_sync_saves", "dion_rank", "lm_head_lr_scale"]
