#!/usr/bin/env bash
# The guidance sweep behind bagel-shapes' task_defaults.json: `bagel eval shapes` on a seed the reported
# scores do not use (555), small n. Usage: bash benchmarks/shapes_sweep.sh [MODEL] [N]
# Prints one line per setting: task, knobs, overall score, per-category scores.
set -euo pipefail
MODEL=${1:-bagel-shapes}
N=${2:-6}
score() {  # TASK KNOBS...
    local task=$1; shift
    bagel eval shapes --model "$MODEL" --task "$task" --n "$N" --seed 555 --json "$@" 2>/dev/null |
        python3 -c "import json,sys; r=json.load(sys.stdin)['scores']['$task']; print('$task', '$*', round(r['overall'],3), {k: round(v,2) for k,v in r['categories'].items()})"
}
for cfg in 3 5 7; do
    for shift in 1 2; do
        score t2i --cfg-text-scale "$cfg" --timestep-shift "$shift"
    done
done
for cfg in 2 4; do
    for img in 1.2 2; do
        score edit --cfg-text-scale "$cfg" --cfg-img-scale "$img"
    done
done
