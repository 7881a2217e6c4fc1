#!/usr/bin/env bash
# Quality of each loading option as `bagel eval shapes` scores on the demo model (CPU, 2 cores).
# Usage: bash benchmarks/shapes_quality.sh [MODEL] [N] [SEED]   -> one JSON line per option in $OUT
# fp8 and nf4 do not run on a CPU (docs/memory.md); run them on a GPU with --device cuda.
set -euo pipefail
MODEL=${1:-bagel-shapes}
N=${2:-20}
SEED=${3:-1234}
OUT=${OUT:-benchmarks/results/shapes-quality-$(date +%Y-%m-%d).jsonl}
mkdir -p "$(dirname "$OUT")"
: > "$OUT"
run() {  # NAME ARGS...
    local name=$1; shift
    local t0=$(date +%s)
    local json
    json=$(bagel eval shapes --model "$MODEL" --n "$N" --seed "$SEED" --device cpu --json "$@")
    echo "{\"option\": \"$name\", \"seconds\": $(( $(date +%s) - t0 )), \"result\": $json}" >> "$OUT"
    echo "$name done ($(( $(date +%s) - t0 )) s)"
}
run float32
run bfloat16 --dtype bfloat16
run int8 --quantize int8
run taylorseer --enable-taylorseer
run offload-model --offload model
run offload-layer --offload layer
echo "wrote $OUT"
python3 "$(dirname "$0")/shapes_table.py" "$OUT"
