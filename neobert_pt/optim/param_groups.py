"""One parameter-grouping policy for every optimizer.

Rules are matched on fully-qualified parameter names (first match wins) and every trainable parameter must land in
exactly one group, or building the optimizer fails. Orthonormal optimizers (Muon, Dion2) take the ``matrix`` and
``qkv`` groups; everything else (token embedding = tied LM head, norms, biases, classifier heads) is a ``scalar``
group stepped with AdamW/Lion and never decayed by default. The tied LM head is the embedding tensor itself, so it
can never be mistaken for a hidden matrix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

# (group name, regex searched in the parameter FQN, kind). First match wins; order matters.
_RULES: tuple[tuple[str, str, str], ...] = (
    ("embedding", r"(^|\.)embeddings\.weight$", "scalar"),
    ("norm", r"norm[^.]*\.(weight|bias)$", "scalar"),
    ("bias", r"\.bias$", "scalar"),
    ("qkv", r"(^|\.)layers\.\d+\.attention\.qkv\.weight$", "matrix"),
    ("matrix", r"(^|\.)layers\.\d+\..*\.weight$", "matrix"),
    ("head", r".*", "scalar"),
)


@dataclass
class ParamGroupSpec:
    """A named set of parameters and how optimizers should treat it."""

    name: str  # "embedding" | "norm" | "bias" | "qkv" | "matrix" | "head"
    kind: str  # "matrix" (orthonormal/decayed) | "scalar" (Adam-like, no decay)
    params: list[nn.Parameter] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    # > 1: the matrix stacks this many independent projections along dim 0 (fused QKV = 3); orthonormal
    # optimizers must treat each block of rows as its own matrix.
    split_rows: int = 1

    @property
    def weight_decay(self) -> bool:
        """Only hidden 2-D block weights decay; embeddings, norms and biases never do."""
        return self.kind == "matrix"

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def group_parameters(model: nn.Module) -> list[ParamGroupSpec]:
    """Split ``model``'s trainable parameters into named groups (empty groups are dropped).

    Works on the unwrapped model and on FSDP2-sharded models (names are unchanged there); a DDP wrapper's
    ``module.`` prefix is harmless because rules are searched, not anchored at the start.
    """
    groups: dict[str, ParamGroupSpec] = {
        name: ParamGroupSpec(name=name, kind=kind, split_rows=3 if name == "qkv" else 1) for name, _, kind in _RULES
    }
    seen: set[int] = set()
    for fqn, param in model.named_parameters():  # named_parameters() de-duplicates tied weights
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        for name, pattern, kind in _RULES:
            if re.search(pattern, fqn):
                if kind == "matrix" and param.ndim != 2:
                    continue
                groups[name].params.append(param)
                groups[name].names.append(fqn)
                break
    result = [g for g in groups.values() if g.params]
    n_grouped = sum(len(g.params) for g in result)
    n_trainable = len({id(p) for p in model.parameters() if p.requires_grad})
    if n_grouped != n_trainable:
        raise RuntimeError(f"param grouping covered {n_grouped} of {n_trainable} trainable parameters")
    return result


def describe_groups(groups: list[ParamGroupSpec]) -> list[str]:
    """One log line per group: name, kind, tensor count, parameter count."""
    return [
        f"{g.name:<9} kind={g.kind:<6} tensors={len(g.params):<4} params={g.numel:,} decay={g.weight_decay}"
        for g in groups
    ]
