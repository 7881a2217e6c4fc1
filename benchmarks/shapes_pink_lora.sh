#!/usr/bin/env bash
# Teach bagel-shapes a new colour (pink, (240,100,180)) with a LoRA fine-tune on the CPU, and score it
# before and after with `bagel eval shapes --new-color pink` (pink prompts apart; every picture judged
# with pink in the palette). Usage: bash benchmarks/shapes_pink_lora.sh [MODEL] [WORK] [STEPS]
set -euo pipefail
MODEL=${1:-bagel-shapes}
WORK=${2:-runs/pink}
STEPS=${3:-1200}
N=${N:-20}
mkdir -p "$WORK"
t0=$(date +%s)
# replay rows of the world (so nothing else is forgotten) and t2i rows that each name a pink object
bagel shapes data "$WORK/data" --t2i 1500 --edit 500 --vqa 500 --seed 11 --new-color pink --new-color-rows 2000
bagel train "$WORK/data/train.jsonl" -m "$MODEL" -o "$WORK/run" --lora-rank 16 --lora-targets all \
    --steps "$STEPS" --lr 1e-3 --min-lr 1e-4 --schedule cosine --warmup-steps 50 --max-tokens 2048 \
    --latent-cache-mb 500 --save-every "$STEPS" --log-every 50 --no-progress --json > "$WORK/train.json"
t1=$(date +%s)
echo "data + LoRA training: $(( t1 - t0 )) s" | tee "$WORK/time.txt"
AFTER="$WORK/run/$(cat "$WORK/run/latest")"
bagel eval shapes -m "$MODEL" --new-color pink --n "$N" --seed 1234 --json > "$WORK/before.json"
bagel eval shapes -m "$AFTER" --new-color pink --n "$N" --seed 1234 --json > "$WORK/after.json"
python3 - "$WORK" <<'PY'
import json, sys
work = sys.argv[1]
b, a = (json.load(open(f"{work}/{x}.json"))["scores"] for x in ("before", "after"))
print("| score | before | after |\n|---|---|---|")
for task in ("t2i", "edit", "vqa"):
    print(f"| {task} overall | {b[task]['overall']:.3f} | {a[task]['overall']:.3f} |")
    for cat in b[task]["categories"]:
        print(f"| {task} {cat} | {b[task]['categories'][cat]:.2f} | {a[task]['categories'][cat]:.2f} |")
print(f"| t2i held-out pairs | {b['t2i']['held_out']:.3f} | {a['t2i']['held_out']:.3f} |")
PY
