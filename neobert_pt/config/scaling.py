"""``model.scaling_rule``: model dimensions derived from one head count, with formulas kept in one YAML file.

The rules live in ``scaling_rules.yaml`` next to this module (shipped with the package). A rule maps each derived
key (``num_attention_heads``, ``hidden_size``, ``num_hidden_layers``, ``intermediate_size``) to an integer formula
of ``heads`` and of the keys derived above it. Formulas are evaluated by a small arithmetic interpreter (``+ - *
// **``, parentheses, integer literals, names), never by ``eval``.
"""

from __future__ import annotations

import ast
import operator
from functools import cache
from pathlib import Path
from typing import Any

from neobert_pt.config.errors import ConfigError
from neobert_pt.config.yamlio import parse_yaml

RULES_FILE = Path(__file__).with_name("scaling_rules.yaml")
DERIVED_KEYS = ("num_attention_heads", "hidden_size", "num_hidden_layers", "intermediate_size")

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
        ast.Pow: operator.pow}


@cache
def scaling_rules() -> dict[str, dict[str, str]]:
    """Every rule of ``scaling_rules.yaml``: name -> {key: formula, 'description': text}."""
    rules = parse_yaml(RULES_FILE.read_text(encoding="utf-8"))
    for name, rule in rules.items():
        missing = [k for k in DERIVED_KEYS if k not in rule]
        if missing:
            raise ConfigError(f"{RULES_FILE}: rule {name!r} lacks formulas for {', '.join(missing)}.")
    return rules


def evaluate(formula: str | int, names: dict[str, int]) -> int:
    """Value of an integer formula such as ``3 * heads // 4`` with ``names`` bound."""
    if isinstance(formula, int):
        return formula

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.Name) and node.id in names:
            return names[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        raise ConfigError(
            f"{RULES_FILE}: cannot evaluate {formula!r}: only integers, + - * // **, parentheses and the names "
            f"{', '.join(names)} are allowed."
        )

    try:
        tree = ast.parse(str(formula), mode="eval")
    except SyntaxError:
        raise ConfigError(f"{RULES_FILE}: {formula!r} is not a formula.") from None
    return walk(tree)


def derive_dimensions(rule_name: str, heads: int) -> dict[str, tuple[int, str]]:
    """``{key: (value, formula)}`` of rule ``rule_name`` at ``heads`` heads, in the rule's order."""
    rules = scaling_rules()
    if rule_name not in rules:
        raise ConfigError(
            f"model.scaling_rule: {rule_name!r} is not a rule of {RULES_FILE.name}; choose one of "
            f"{', '.join(repr(r) for r in rules)} (or null to set the dimensions directly)."
        )
    names: dict[str, int] = {"heads": heads}
    out: dict[str, tuple[int, str]] = {}
    for key, formula in rules[rule_name].items():
        if key == "description":
            continue
        if key not in DERIVED_KEYS:
            raise ConfigError(f"{RULES_FILE}: rule {rule_name!r} sets {key!r}; rules may set only {DERIVED_KEYS}.")
        value = evaluate(formula, names)
        names[key] = value
        out[key] = (value, str(formula))
    return out


def apply_scaling_rule(model: Any) -> None:
    """Fill a ``ModelConfig``'s dimensions from its ``scaling_rule`` and ``heads`` (called by its validation)."""
    if model.scaling_rule is None:
        raise ConfigError(
            f"model.heads={model.heads} is set but model.scaling_rule is null; set --model.scaling_rule "
            f"(one of {', '.join(scaling_rules())}) or drop model.heads."
        )
    if model.heads is None or model.heads < 1:
        raise ConfigError(
            f"model.scaling_rule={model.scaling_rule!r} needs model.heads >= 1 (got {model.heads}); "
            "e.g. --model.heads 12."
        )
    for key, (value, formula) in derive_dimensions(model.scaling_rule, model.heads).items():
        if value < 1:
            raise ConfigError(
                f"model.scaling_rule={model.scaling_rule!r} gives model.{key} = {formula} = {value} at "
                f"model.heads={model.heads}; use more heads."
            )
        setattr(model, key, value)


def derivation_notes(model: Any) -> dict[str, str]:
    """``{'model.hidden_size': 'scaling_rule neobert: 64 * heads (heads=8)', ...}`` for --print-config."""
    if model.scaling_rule is None:
        return {}
    return {f"model.{key}": f"scaling_rule {model.scaling_rule}: {formula} (heads={model.heads})"
            for key, (_, formula) in derive_dimensions(model.scaling_rule, model.heads).items()}
