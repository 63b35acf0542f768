"""neobert_pt uses no private framework state: no accelerate/torch internals that break silently on an upgrade.

Every ``.py`` file under ``neobert_pt/`` is searched (code, comments and docstrings alike) for the patterns below. A
hit fails the test unless ``ALLOWED`` lists that file and pattern with the reason no public API serves; an entry
that no longer matches anything fails too, so the list only shrinks. Public replacements used instead:
``accelerator.prepare_optimizer`` / ``fully_shard`` (train/distributed.py), ``scheduler.get_last_lr()``,
``torch.optim.adamw.adamw(..., fused=True)`` and the foreach ops (optim/), ``Subset``/index lists (data/).
"""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "neobert_pt"

# name -> regex. `acc` is the trainer's usual alias of the Accelerator.
FORBIDDEN = {
    "accelerator._": r"\b(?:accelerator|acc)\._\w",
    "._last_lr": r"\._last_lr\b",
    "torch._C": r"\btorch\._C\b",
    "_fused_": r"_fused_",
    "_group_tensors": r"_group_tensors",
    "._indices": r"\._indices\b",
    "._parameters[": r"\._parameters\[",
    # QK-clip through the model's own API, not a monkeypatched observer that stops attention with an exception.
    "_StopAttention": r"_StopAttention",
    "qk_observer": r"\bqk_observer\b",
}

# (file relative to neobert_pt/, pattern name): why no public API serves. Keep entries few, specific and temporary.
ALLOWED: dict[tuple[str, str], str] = {}


def _hits() -> dict[tuple[str, str], list[int]]:
    found: dict[tuple[str, str], list[int]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            for name, regex in FORBIDDEN.items():
                if re.search(regex, line):
                    found.setdefault((rel, name), []).append(lineno)
    return found


def test_no_private_framework_state_outside_the_allow_list():
    hits = _hits()
    unexplained = {key: lines for key, lines in hits.items() if key not in ALLOWED}
    assert not unexplained, "private framework state in neobert_pt/ (use a public API, or add an ALLOWED entry " \
        "with the reason): " + "; ".join(f"neobert_pt/{f}:{lines} uses {name!r}"
                                        for (f, name), lines in sorted(unexplained.items()))


def test_every_allow_list_entry_is_still_needed_and_explained():
    hits = _hits()
    stale = sorted(key for key in ALLOWED if key not in hits)
    assert not stale, f"ALLOWED entries that match nothing any more, delete them: {stale}"
    assert all(reason.strip() for reason in ALLOWED.values())


def test_the_search_finds_what_it_forbids(tmp_path):
    """The regexes catch the forms the code used to have (so an empty result means something)."""
    samples = {
        "accelerator._": "accelerator._optimizers.remove(x)", "._last_lr": "lr = scheduler._last_lr[0]",
        "torch._C": "torch._C._current_graph_task_id()", "_fused_": "torch._fused_adamw_(p, g)",
        "_group_tensors": "Optimizer._group_tensors_by_device_and_dtype(t)", "._indices": "ds._indices",
        "._parameters[": "owner._parameters[attr] = t", "_StopAttention": "raise _StopAttention",
        "qk_observer": "attn.qk_observer = f",
    }
    for name, regex in FORBIDDEN.items():
        assert re.search(regex, samples[name]), name
    assert not re.search(FORBIDDEN["accelerator._"], "accelerator.prepare_optimizer(opt)")
    assert not re.search(FORBIDDEN["._indices"], "layout.indices")
