"""The optimizer catalog: the one list of optimizers, each registered once with its config class and builder.

Torch-free on purpose (it imports only the stdlib and the leaf modules ``neobert_pt/errors.py`` and
``neobert_pt/fields.py``), so the config side can read it without importing any optimizer. Everything that lists
optimizers derives from it:

- the choices of ``optimizer.name`` and one sub-block field per config class (:func:`optimizer_section`, used by
  ``neobert_pt/optim/config.py``), hence YAML/CLI validation, ``pretrain.py --help``, ``docs/configuration.md`` and
  the key snapshot;
- the sub-block -> optimizers map behind the "sub-block set for another optimizer" warning (:func:`subblock_users`);
- the peak-LR power laws behind ``optimizer.lr: auto`` (``neobert_pt/optim/lr_rule.py``);
- the builder that ``neobert_pt/optim/registry.py`` calls, named here as ``"module:function"`` (imported only when
  that optimizer is built) or given as the function itself.

The built-in optimizers register in ``neobert_pt/optim/config.py``. Registration closes when the ``optimizer`` config
section is built (the first import of ``neobert_pt/optim/config.py``, e.g. by ``import neobert_pt.config``): a
module that registers another optimizer must be imported before that (docs/optimizers.md, "Adding an optimizer").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from neobert_pt.errors import ConfigError
from neobert_pt.fields import option

# The two batch sizes the DANA paper fitted its peak-LR power laws at (tokens per optimizer step; 32 and 512
# sequences of 2048 tokens). neobert_pt/optim/lr_rule.py interpolates between them.
SMALL_BATCH_TOKENS = 32 * 2048
LARGE_BATCH_TOKENS = 512 * 2048

# kappa (None: kappa plays no role for this optimizer) -> {tokens per step: (a, b, d)} of lr* = a * (b + P) ** d.
LrFits = Mapping[float | None, Mapping[int, tuple[float, float, float]]]


@dataclass(frozen=True)
class OptimizerEntry:
    """One registered optimizer."""

    name: str  # the value of optimizer.name
    summary: str  # one line for docs/configuration.md
    builder: str | Callable[..., Any]  # "module:function" or the function: (OptimizerContext) -> BuiltOptimizer
    block: str | None = None  # the optimizer.<block> sub-block it reads, e.g. "dion2_config"
    config: type | None = None  # the dataclass of that sub-block
    lr_fits: LrFits | None = None  # the power laws of optimizer.lr: auto (None: no rule; lr must be a number)


_ENTRIES: dict[str, OptimizerEntry] = {}
_SECTION: type | None = None  # the optimizer config section, once built; registration is closed from then on


def register_optimizer(
    name: str,
    *,
    summary: str,
    builder: str | Callable[..., Any],
    config: type | None = None,
    block: str | None = None,
    lr_fits: LrFits | None = None,
) -> OptimizerEntry:
    """Register optimizer ``name``: its builder, its config sub-block (``block`` holding a ``config`` dataclass,
    possibly shared with other optimizers) and, optionally, the power laws of ``optimizer.lr: auto``."""
    if _SECTION is not None:
        raise RuntimeError(
            f"optimizer {name!r} is registered after the optimizer config section was built (by the first import of "
            "neobert_pt.optim.config, e.g. via neobert_pt.config); import the module that registers it first."
        )
    if name in _ENTRIES:
        raise ValueError(f"optimizer {name!r} is registered twice")
    if (config is None) != (block is None):
        raise ValueError(f"optimizer {name!r}: give both config= (a dataclass) and block= (its key), or neither")
    if config is not None and not (isinstance(config, type) and dataclasses.is_dataclass(config)):
        raise ValueError(f"optimizer {name!r}: config= must be a dataclass, got {config!r}")
    if block is not None:
        shared = next((e for e in _ENTRIES.values() if e.block == block), None)
        if shared is not None and shared.config is not config:
            raise ValueError(
                f"optimizer {name!r}: sub-block {block!r} already holds {shared.config.__name__} (of {shared.name!r})"
            )
    if isinstance(builder, str) and (":" not in builder or not all(builder.partition(":")[::2])):
        raise ValueError(f"optimizer {name!r}: builder must be a function or 'module:function', got {builder!r}")
    entry = OptimizerEntry(name, summary, builder, block, config, lr_fits)
    _ENTRIES[name] = entry
    return entry


def optimizer_entries() -> tuple[OptimizerEntry, ...]:
    """Every registered optimizer, in registration order."""
    return tuple(_ENTRIES.values())


def available_optimizers() -> list[str]:
    return sorted(_ENTRIES)


def optimizer_entry(name: str) -> OptimizerEntry:
    """The entry of ``name``; an unknown name is a ConfigError listing the registered ones."""
    if name not in _ENTRIES:
        raise ConfigError(
            f"optimizer.name={name!r} is not registered; valid: {', '.join(available_optimizers())}; "
            "set --optimizer.name to one of them."
        )
    return _ENTRIES[name]


def subblock_users() -> dict[str, tuple[str, ...]]:
    """Each config sub-block with the optimizer names that read it, in registration order."""
    users: dict[str, tuple[str, ...]] = {}
    for e in _ENTRIES.values():
        if e.block is not None:
            users[e.block] = (*users.get(e.block, ()), e.name)
    return users


def _block_help(users: tuple[str, ...]) -> str:
    names = [repr(n) for n in users]
    which = names[0] if len(names) == 1 else f"one of {', '.join(names[:-1])} or {names[-1]}"
    return f"Settings used when name is {which}."


def optimizer_section(base: type) -> type:
    """The ``optimizer`` config section: ``base``'s fields (the shared hyperparameters and ``name``), with ``name``
    limited to the registered optimizers and one sub-block field per registered config class, in registration order.

    Called once, by ``neobert_pt/optim/config.py``; registration is closed from then on, so the section, the
    validation and the docs can never disagree with the catalog.
    """
    global _SECTION
    if _SECTION is not None:
        raise RuntimeError("the optimizer config section is built once (neobert_pt/optim/config.py)")
    name_field = next(f for f in dataclasses.fields(base) if f.name == "name")
    names = tuple(_ENTRIES)
    fields: list[tuple[str, Any, Any]] = [
        ("name", Literal[names], dataclasses.field(default=name_field.default, metadata=name_field.metadata))
    ]
    for block, users in subblock_users().items():
        config = _ENTRIES[users[0]].config
        fields.append((block, config, option(config, _block_help(users))))
    _SECTION = dataclasses.make_dataclass(
        "OptimizerConfig", fields, bases=(base,), namespace={"__doc__": base.__doc__, "__module__": base.__module__}
    )
    return _SECTION
