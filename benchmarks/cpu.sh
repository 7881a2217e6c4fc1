#!/usr/bin/env bash
# The CPU figures of benchmarks/RESULTS.md and COMPARE.md: the tiny checkpoint and the mid-size
# random config. Run from the repository root with the venv active; about 10 minutes on 2 cores.
# Usage: benchmarks/cpu.sh [extra bench options, e.g. --date 2026-11-23]
set -euo pipefail
B=(bagel bench --record benchmarks "$@")
TINY=tests/data/tiny-v1/model
MID=benchmarks/configs/mid

"${B[@]}" --model $TINY --height 64 --width 64
"${B[@]}" --model $TINY -w edit --height 64 --width 64
"${B[@]}" --model $TINY -w understand --height 64 --width 64
"${B[@]}" --model $TINY -w chat

"${B[@]}" --random-weights $MID --height 128 --width 128
"${B[@]}" --random-weights $MID --height 256 --width 256
"${B[@]}" --random-weights $MID --height 128 --width 128 --batch-size 4
"${B[@]}" --random-weights $MID -w edit --height 128 --width 128
"${B[@]}" --random-weights $MID -w understand --height 256 --width 256
"${B[@]}" --random-weights $MID -w chat

# What each loading option costs, against float32 (same seeds and prompts).
"${B[@]}" --random-weights $MID --height 128 --width 128 \
    --compare dtype=bfloat16 quantize=int8 quantize=fp8 quantize=nf4 offload=model offload=layer \
              compile=true enable_taylorseer=true

# Serving: a real server on loopback, 1 / 4 / 8 concurrent clients, --max-batch 8 against --max-batch 1.
bagel bench -w serve --model $TINY --height 64 --width 64 --max-new-tokens 65 --record benchmarks
bagel bench -w serve --random-weights $MID --height 64 --width 64 --max-new-tokens 65 --record benchmarks
