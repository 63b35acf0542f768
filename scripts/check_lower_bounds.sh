#!/usr/bin/env bash
# Run the test suite against the LOWER bounds pyproject.toml declares (torch 2.11, transformers 5.17, accelerate 1.15;
# the GPU image's versions) in a throwaway venv; CI keeps the exact versions of requirements.lock.
#   bash scripts/check_lower_bounds.sh [pytest args]      # default: -m "not slow" tests
# The venv (LOWER_VENV, default /tmp/neobert_pt_lower) is reused when it already holds these versions. The other
# packages take their requirements.lock versions. On x86_64 PyPI's torch 2.11 is a CUDA build (several GB); it runs
# on a CPU-only machine too.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LOWER_VENV:-/tmp/neobert_pt_lower}"
PY="$VENV/bin/python"
LOWER=(torch==2.11.0 transformers==5.17.0 accelerate==1.15.0)

have() {
  "$PY" - "${LOWER[@]}" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(any(version(req.split("==")[0]).split("+")[0] != req.split("==")[1] for req in sys.argv[1:]))
PY
}

if [ ! -x "$PY" ] || ! have; then
  echo "[lower-bounds] installing ${LOWER[*]} and the rest of requirements.lock into $VENV"
  python3 -m venv "$VENV"
  constraints="$(mktemp)"
  grep -vE '^(torch|transformers|accelerate)==' "$ROOT/requirements.lock" > "$constraints"
  printf '%s\n' "${LOWER[@]}" >> "$constraints"
  "$PY" -m pip install --quiet --upgrade pip
  "$PY" -m pip install --quiet -c "$constraints" "${LOWER[@]}"
  "$PY" -m pip install --quiet -c "$constraints" -e "$ROOT[dev]"
  rm -f "$constraints"
  have || { echo "[lower-bounds] $VENV does not hold ${LOWER[*]} after the install" >&2; exit 1; }
fi
"$PY" -c "import torch, transformers, accelerate; print('[lower-bounds] torch', torch.__version__, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__)"
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"
if [ $# -eq 0 ]; then set -- -m "not slow" tests; fi
exec "$PY" -m pytest -p no:cacheprovider "$@"
