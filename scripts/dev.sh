#!/usr/bin/env bash
# One entry point that does all set-up on a machine with only python3, then runs what you ask for.
#   bash scripts/dev.sh pretrain [--trainer.max_steps N ...]   # pretrain NeoBERT on the embedded default corpus
#   bash scripts/dev.sh evaluate [RUN_DIR] [evaluate args]      # probe (vs a random init) + PPPL of the tiny model
#   bash scripts/dev.sh test [pytest args]                       # run the test suite
#   bash scripts/dev.sh setup                                    # only create/refresh .venv
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NEOBERT_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

setup() {
  if [ ! -x "$PY" ]; then
    echo "[setup] creating virtual environment in $VENV"
    python3 -m venv "$VENV"
  fi
  # Re-install only when pyproject.toml (the supported ranges) or requirements.lock (the exact tested versions)
  # changed since the last successful install.
  local stamp="$VENV/.neobert_pt_installed"
  local lock="$ROOT/requirements.lock"
  local want
  want="$(cat "$ROOT/pyproject.toml" "$lock" | sha256sum | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing neobert_pt with the locked dependency versions (first run takes a few minutes)"
    "$PY" -m pip install --quiet --upgrade pip
    # torch first, at the locked version, so a CPU machine takes the CPU build instead of resolving a CUDA build
    # via accelerate.
    "$PY" -m pip install --quiet -c "$lock" torch
    "$PY" -m pip install --quiet -c "$lock" -e "$ROOT[dev]"
    echo "$want" > "$stamp"
  fi
}

cmd="${1:-help}"
shift || true
case "$cmd" in
  setup)
    setup
    ;;
  test)
    setup
    export WANDB_MODE="${WANDB_MODE:-disabled}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    export TOKENIZERS_PARALLELISM=false
    cd "$ROOT"
    exec "$PY" -m pytest "$@"
    ;;
  pretrain)
    setup
    export WANDB_MODE="${WANDB_MODE:-disabled}" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
    cd "$ROOT"
    exec "$PY" scripts/pretraining/pretrain.py configs/pretraining/pretrain_tiny.yaml "$@"
    ;;
  evaluate)
    setup
    export WANDB_MODE="${WANDB_MODE:-disabled}" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
    cd "$ROOT"
    run_dir="./outputs/tiny"
    if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then run_dir="$1"; shift; fi
    if [ ! -f "$run_dir/final/config.json" ]; then
      echo "[evaluate] no model in $run_dir/final: pretraining the tiny config first (a few minutes)"
      "$PY" scripts/pretraining/pretrain.py configs/pretraining/pretrain_tiny.yaml --trainer.output_dir "$run_dir"
    fi
    exec "$PY" -m neobert_pt.evaluate "$run_dir" --suite probe pppl --pppl-max-tokens 2000 "$@"
    ;;
  *)
    sed -n '2,7p' "$0"
    exit 2
    ;;
esac
