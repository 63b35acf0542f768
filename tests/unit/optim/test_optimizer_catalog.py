"""The optimizer catalog is the single list: config validation, docs, the LR rule and the builders derive from it.

The toy-optimizer test follows docs/optimizers.md ("Adding an optimizer") literally: one file
(tests/unit/optim/toy_optimizer.py) with a config class, a builder and one ``register_optimizer`` call, imported
before ``neobert_pt.config``; nothing else is edited. It runs in a fresh interpreter because registration closes once
the optimizer config section is built, which the rest of this test session has already done.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap

import pytest

from neobert_pt.config import ConfigError, RunConfig
from neobert_pt.optim.catalog import optimizer_entries, optimizer_entry, register_optimizer
from neobert_pt.optim.registry import load_builder

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
HERE = os.path.dirname(os.path.abspath(__file__))


def _run_python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter from the repository root; it prints one JSON object as its last line."""
    env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_the_config_imports_no_optimizer():
    """``import neobert_pt.config`` loads the torch-free config side of neobert_pt.optim and nothing else of it."""
    out = _run_python(textwrap.dedent("""
        import json, sys
        import neobert_pt.config
        print(json.dumps(sorted(m for m in sys.modules if m.startswith(("neobert_pt.optim", "neobert_pt.train")))))
    """))
    assert out == ["neobert_pt.optim", "neobert_pt.optim.catalog", "neobert_pt.optim.config"]


@pytest.mark.parametrize("package", ["neobert_pt/config/__init__.py", "neobert_pt/optim/__init__.py"])
def test_package_files_have_no_lazy_exports(package):
    tree = ast.parse(open(os.path.join(REPO, package), encoding="utf-8").read())
    functions = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    assert "__getattr__" not in functions


def test_every_builder_resolves_and_names_its_optimizer():
    for entry in optimizer_entries():
        builder = load_builder(entry)
        assert callable(builder), entry.name
        assert entry.summary and "\n" not in entry.summary, entry.name


def test_registration_is_closed_once_the_section_is_built():
    RunConfig()  # the section exists: neobert_pt.config is imported
    with pytest.raises(RuntimeError, match="registered after the optimizer config section was built"):
        register_optimizer("late", summary="too late", builder="math:sqrt")
    with pytest.raises(ConfigError, match="optimizer.name='late' is not registered; valid: adamw, adamw-decaying-wd"):
        optimizer_entry("late")


TOY_RUN = """
import json, sys, warnings
sys.path.insert(0, {here!r})
import toy_optimizer  # the one file; imported before neobert_pt.config, as docs/optimizers.md says

import copy
import torch
from neobert_pt.config import ConfigError, ConfigWarning, load_config
from neobert_pt.config.cli import help_text
from neobert_pt.config.docgen import markdown, snapshot
from neobert_pt.modeling import NeoBERTConfig, NeoBERTForMaskedLM
from neobert_pt.optim.registry import OptimizerContext, build_optimizer

out = {{}}
path = {yaml!r}
with open(path, "w") as f:
    f.write("optimizer:\\n  name: toy-sgd\\n  lr: 0.01\\n  weight_decay: 0.0\\n  toy_config:\\n    momentum: 0.8\\n")


def error(overrides, source=path):
    try:
        load_config(source, overrides)
    except ConfigError as err:
        return str(err)
    return None


cfg = load_config(path, ["--optimizer.toy_config.nesterov", "true"])
out["loaded"] = [cfg.optimizer.name, cfg.optimizer.toy_config.momentum, cfg.optimizer.toy_config.nesterov]
out["bad_value"] = error(["--optimizer.toy_config.momentum", "1.5"])
out["bad_type"] = error(["--optimizer.toy_config.nesterov", "maybe"])
out["bad_key"] = error(["--optimizer.toy_config.momentm", "0.5"])
out["bad_name"] = error(["--optimizer.name", "toy-sdg"])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    load_config(None, ["--optimizer.toy_config.momentum", "0.5"])  # optimizer.name stays adamw
out["unused_warning"] = [str(w.message) for w in caught if issubclass(w.category, ConfigWarning)]
out["docs"] = markdown()
out["snapshot"] = snapshot()
out["help"] = help_text()

# The trainer's build path: OptimizerContext -> build_optimizer, then a step compared with torch SGD by hand.
torch.manual_seed(0)
model = NeoBERTForMaskedLM(NeoBERTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=32))
reference = copy.deepcopy(model)
built = build_optimizer(OptimizerContext(model=model, config=cfg.optimizer, max_steps=4))
by_hand = torch.optim.SGD(reference.parameters(), lr=0.01, momentum=0.8, nesterov=True)
ids = torch.randint(0, 64, (2, 16))
before = [p.detach().clone() for p in model.parameters()]
for _ in range(2):
    for m, opt in ((model, built.optimizer), (reference, by_hand)):
        opt.zero_grad()
        m(input_ids=ids, labels=ids).loss.backward()
        opt.step()
out["optimizer_type"] = type(built.optimizer).__name__
out["log_lines"] = built.log_lines
out["moved"] = all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
out["matches_sgd"] = all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))
print(json.dumps(out))
"""


def test_toy_optimizer_from_one_file_is_validated_documented_and_built(tmp_path):
    out = _run_python(TOY_RUN.format(here=HERE, yaml=str(tmp_path / "toy.yaml")))

    # Selected from YAML with its sub-block, plus a CLI override into the sub-block.
    assert out["loaded"] == ["toy-sgd", 0.8, True]
    # Bad values are one line naming the dotted key, what is allowed and how to fix it.
    assert out["bad_value"] == (
        "optimizer.toy_config.momentum=1.5 is invalid: must be in [0, 1); "
        "set --optimizer.toy_config.momentum to a valid value."
    )
    assert out["bad_type"] == "optimizer.toy_config.nesterov: cannot use 'maybe' (str); expected bool."
    assert out["bad_key"] == "Unknown config key optimizer.toy_config.momentm. Did you mean optimizer.toy_config.momentum?"
    assert "optimizer.name: 'toy-sdg' is not an allowed value" in out["bad_name"]
    assert out["bad_name"].endswith("Did you mean 'toy-sgd'?")
    assert all("\n" not in out[k] for k in ("bad_value", "bad_type", "bad_key", "bad_name"))
    # A sub-block set for an optimizer that is not selected warns, naming its reader.
    assert out["unused_warning"] == [
        "optimizer.toy_config is set (momentum) but optimizer.name is 'adamw'; it is ignored (it applies to toy-sgd)."
    ]
    # Generated docs, key snapshot and --help list it.
    docs = out["docs"]
    assert "| `toy-sgd` | `optimizer.toy_config` | no | Toy SGD with momentum" in docs
    assert "### `optimizer.toy_config`" in docs and "| `optimizer.toy_config.momentum` | float | `0.9` |" in docs
    assert "  - `optimizer.toy_config` is read by `toy-sgd`." in docs
    name_row = next(line for line in docs.splitlines() if line.startswith("| `optimizer.name` | '"))
    assert "'toy-sgd'" in name_row
    assert "optimizer.toy_config.nesterov: bool = false\n" in out["snapshot"]
    assert "  --optimizer.toy_config.momentum float  (default: 0.9)" in out["help"]
    assert "'toy-sgd'" in out["help"].split("--optimizer.name ")[1].split("\n")[0]
    # The trainer's build path returns a working optimizer: it steps, exactly as torch SGD configured by hand.
    assert out["optimizer_type"] == "SGD"
    assert out["log_lines"][0] == "optimizer toy-sgd: peak lr 0.01" and "toy-sgd: momentum=0.8 nesterov=True" in out["log_lines"]
    assert out["moved"] and out["matches_sgd"]
