#!/usr/bin/env bash
# Dion2 robustness matrix (stages A–E) with computed pass/fail gates. See docs/robustness.md.
#
#   WANDB_PROJECT=neobert-dion2-robustness WANDB_ENTITY=<entity> ./jobs/experiment_dion2_robustness.sh
#   FSDP2_CONFIG=configs/accelerate/fsdp2_1d_2gpu.yaml RUN_FSDP2=1 ./jobs/experiment_dion2_robustness.sh
#   PROFILE=cpu ./jobs/experiment_dion2_robustness.sh          # whole matrix on a CPU machine in minutes (gloo)
#
# Env knobs (defaults in brackets):
#   PROFILE [paper]         paper = runbook budgets (200/200/200/10k x3 seeds/2k->4k); cpu = tiny model, gloo
#   STAGES [A B C D E]      VARIANTS [adamw muonclip dion2 dion2_qk]      SEEDS [profile's: 42 1337 3407]
#   STEPS ["" e.g. "A=50 D=2000"]  per-stage step budgets
#   RUN_FSDP2 [1]           0 skips stage C and the FSDP2 half of stage E
#   FSDP2_CONFIG [profile's configs/accelerate/fsdp2_1d_*.yaml]
#   NUM_PROCESSES [2]       ACCELERATE_BIN [accelerate]       PYTHON_BIN [python3 / .venv]
#   OUTPUT_ROOT [./outputs/exp/$WANDB_GROUP]                  RUN_TIMEOUT [none] seconds per run
#   WANDB_MODE [online for paper, disabled for cpu]  WANDB_PROJECT [neobert-dion2-robustness]  WANDB_ENTITY []
#   WANDB_GROUP [dion2-robustness-<timestamp>]       WANDB_TAGS [[dion2,robustness]]
#   STRICT [0]              1 makes the throughput guardrails fatal
# Re-running the same command skips completed runs; a failed run is recorded with its log and the matrix goes on.
# Exit code 0 only when every fatal gate passes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PROFILE="${PROFILE:-paper}"
if [ -z "${PYTHON_BIN:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON_BIN=.venv/bin/python; else PYTHON_BIN=python3; fi
fi
if [ -z "${ACCELERATE_BIN:-}" ]; then
  if [ -x .venv/bin/accelerate ]; then ACCELERATE_BIN=.venv/bin/accelerate; else ACCELERATE_BIN=accelerate; fi
fi
default_mode=online; [ "$PROFILE" = cpu ] && default_mode=disabled
WANDB_MODE="${WANDB_MODE:-$default_mode}"
WANDB_PROJECT="${WANDB_PROJECT:-neobert-dion2-robustness}"
WANDB_GROUP="${WANDB_GROUP:-dion2-robustness-$(date +%Y%m%d-%H%M%S)}"
WANDB_TAGS="${WANDB_TAGS:-[dion2,robustness]}"
OUTPUT_ROOT="${OUTPUT_ROOT:-./outputs/exp/$WANDB_GROUP}"

args=(run --profile "$PROFILE" --output-root "$OUTPUT_ROOT"
      --python-bin "$PYTHON_BIN" --accelerate-bin "$ACCELERATE_BIN" --num-processes "${NUM_PROCESSES:-2}"
      --override "--wandb.mode $WANDB_MODE" --override "--wandb.project $WANDB_PROJECT"
      --override "--wandb.group $WANDB_GROUP" --override "--wandb.tags $WANDB_TAGS")
[ -n "${WANDB_ENTITY:-}" ] && args+=(--override "--wandb.entity $WANDB_ENTITY")
[ -n "${STAGES:-}" ] && args+=(--stages "$STAGES")
[ -n "${VARIANTS:-}" ] && args+=(--variants "$VARIANTS")
[ -n "${SEEDS:-}" ] && args+=(--seeds "$SEEDS")
[ -n "${STEPS:-}" ] && args+=(--steps "$STEPS")
[ "${RUN_FSDP2:-1}" = 0 ] && args+=(--no-fsdp2)
if [ -n "${FSDP2_CONFIG:-}" ]; then
  [ -f "$FSDP2_CONFIG" ] || { echo "FSDP2_CONFIG=$FSDP2_CONFIG does not exist" >&2; exit 2; }
  args+=(--fsdp2-config "$FSDP2_CONFIG")
fi
[ -n "${RUN_TIMEOUT:-}" ] && args+=(--run-timeout "$RUN_TIMEOUT")
[ "${STRICT:-0}" = 1 ] && args+=(--strict)

echo "robustness matrix: profile=$PROFILE output=$OUTPUT_ROOT wandb=$WANDB_MODE/$WANDB_PROJECT group=$WANDB_GROUP"
exec "$PYTHON_BIN" -m neobert_pt.robustness "${args[@]}"
