#!/usr/bin/env bash
# MAML's paper-protocol Omniglot cells (5-way and 20-way, 1- and 5-shot) on one lent GPU, time-boxed and
# resumable; each cell's evaluation writes its result record (with the GPU's name) into RESULTS.
#
#   scripts/gpu-table.sh [RUNS [RESULTS]]      (defaults: runs/gpu-table, results/omniglot)
#
# Environment:
#   BUDGET_S   seconds of training for all cells together (default 600; about 12 minutes with the evaluations)
#   CELLS      the cells, WAYS:SHOTS (default "5:1 5:5 20:1 20:5")
#   PRESET     the preset (default paper: the MAML paper's budgets, 60,000 meta-steps)
#   TRAIN_ARGS, EVAL_ARGS  extra flags (a test runs it on the CPU with a tiny budget)
#   PYTHON     the interpreter (default python)
#
# Each cell trains for its share of BUDGET_S (train is stopped with SIGTERM, which checkpoints), then
# its newest checkpoint is evaluated on the 600 test tasks.  Run it again to go on: unfinished runs resume
# where they stopped, finished ones are only evaluated.  Never requires a GPU: on the CPU it is only slow.
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs/gpu-table}
results=${2:-results/omniglot}
budget=${BUDGET_S:-600}
cells=${CELLS:-"5:1 5:5 20:1 20:5"}
preset=${PRESET:-paper}
python=${PYTHON:-python}
read -r -a count <<<"$cells"
share=$((budget / ${#count[@]}))
mkdir -p "$runs" "$results"
for cell in $cells; do
  ways=${cell%%:*}
  shots=${cell##*:}
  run="$runs/omniglot-${ways}w${shots}s-maml-$preset"
  resume=()
  [ -f "$run/config.json" ] && resume=(--resume)
  echo "== ${ways}-way ${shots}-shot MAML ($preset): training for up to ${share}s into $run"
  # shellcheck disable=SC2086
  timeout -s TERM -k 60 "$share" "$python" -m experiments.omniglot train --ways "$ways" --shots "$shots" \
    --algo maml --preset "$preset" --no-progress --out "$run" "${resume[@]}" ${TRAIN_ARGS:-}
  rc=$?
  case $rc in
    0) echo "   finished its budget" ;;
    124 | 143) echo "   stopped at its time share (resume: run this script again)" ;;
    *) echo "   train failed (exit $rc)"; [ -f "$run/config.json" ] || continue ;;
  esac
  # shellcheck disable=SC2086
  "$python" -m experiments.omniglot evaluate --run "$run" --results "$results" ${EVAL_ARGS:-} || echo "   evaluate failed"
done
"$python" -m experiments.omniglot table --results "$results"
