#!/usr/bin/env bash
# The GPU figures still missing (issues 5 and 6, and training), as ONE prepared device run: about
# 8 minutes on an H100 / H200 with the full-size architecture and random weights (29 GB in bf16).
# Needs torch, safetensors, tokenizers, typer, tqdm, pillow, huggingface-hub (no install: runs from the tree).
#
#   bash benchmarks/gpu.sh OUTDIR                      # on the GPU machine, from the repository root
#   CFG=benchmarks/configs/mid SIZE=128 TRAIN_SIZE=128 DTYPE=float32 bash benchmarks/gpu.sh /tmp/dry   # CPU dry run
#
# OUTDIR gets log.txt, train.json and records.tgz (work/rec/RESULTS.md, COMPARE.md and results/*.json from
# bench --record); copy the rows into benchmarks/RESULTS.md and the figures into README.md, docs/memory.md
# and docs/training.md, with the date and the device.
set -uo pipefail
OUT=${1:-/tmp/gpu-bench}
CFG=${CFG:-tests/data/bagel-7b-mot}
SIZE=${SIZE:-1024}
TRAIN_SIZE=${TRAIN_SIZE:-512}
DTYPE=${DTYPE:-bfloat16}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
BAGEL=(python3 -m bagel_engine.cli.main)
BENCH=("${BAGEL[@]}" bench --random-weights "$CFG" --dtype "$DTYPE" --record "$OUT/work/rec")

run() {  # one step; a failure is logged and the next step runs
    echo "== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/log.txt"
    timeout "${STEP_TIMEOUT:-300}" "$@" 2>&1 | tee -a "$OUT/log.txt"
    echo "== exit ${PIPESTATUS[0]}" | tee -a "$OUT/log.txt"
}

python3 -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())" \
    | tee -a "$OUT/log.txt"

# issue 5: text to image 1024x1024, 50 steps, cfg 4 / 1, interval 0.4-1 (the floor workload)
run "${BENCH[@]}" --height "$SIZE" --width "$SIZE" --num-timesteps 50 --cfg-text-scale 4 --cfg-img-scale 1 \
    --cfg-interval 0.4 1 --repeat 2 --warmup 1
# issue 5: an edit of a 1024x1024 image with the app's edit defaults (cfg 4 / 2, interval 0-1, text_channel)
run "${BENCH[@]}" -w edit --height "$SIZE" --width "$SIZE" --repeat 1 --warmup 1
# issue 5: 256 tokens of image understanding
run "${BENCH[@]}" -w understand --height "$SIZE" --width "$SIZE" --max-new-tokens 257 --repeat 2 --warmup 1
# issue 6: what offload costs on a GPU (fp8 / int8 / nf4 need torchao / bitsandbytes wheels carried in)
run "${BENCH[@]}" --height "$SIZE" --width "$SIZE" --num-timesteps 20 --cfg-img-scale 1 --repeat 1 --warmup 1 \
    --compare offload=model enable_taylorseer=true
# VAE tiling: the decode's peak memory and time at 1024x1024 in tiles of 256 px against untiled (4 steps: the
# denoising is the same; the quality column compares the random-weight VAE's pictures, so only the memory counts)
run "${BENCH[@]}" --height "$SIZE" --width "$SIZE" --num-timesteps 4 --cfg-img-scale 1 --repeat 1 --warmup 1 \
    --compare vae_tiling=true
# training: LoRA on the generation expert, bf16 base, gradient checkpointing (the one-GPU recipe)
run "${BAGEL[@]}" bench -w train --random-weights "$CFG" --dtype "$DTYPE" --lora-rank 32 --gradient-checkpointing \
    --max-tokens 4096 --height "$TRAIN_SIZE" --width "$TRAIN_SIZE" --repeat 3 --warmup 1 --json
# issue 12: a real server under 1 / 4 / 8 concurrent clients, --max-batch 8 against 1 (needs fastapi, uvicorn
# and httpx on the machine; skipped without them): images of 512x512 and 512x256 in 20 steps, chat of 64 tokens
if python3 -c "import fastapi, uvicorn, httpx" 2>/dev/null; then
    STEP_TIMEOUT=${SERVE_TIMEOUT:-420} run "${BAGEL[@]}" bench -w serve --random-weights "$CFG" --dtype "$DTYPE" \
        --height $((SIZE / 2)) --width $((SIZE / 2)) --num-timesteps 20 --max-new-tokens 65 \
        --concurrency 1 --concurrency 4 --concurrency 8 --record "$OUT/work/rec"
else
    echo "== serve bench skipped: fastapi / uvicorn / httpx are not installed" | tee -a "$OUT/log.txt"
fi
# issue 14: serving replicas on Ray, two replicas of a model directory sharing the card (needs ray; REPLICA_MODEL: a
# model directory or hub id present on the machine, e.g. bagel-shapes, which needs no download)
if [ -n "${REPLICA_MODEL:-}" ] && python3 -c "import ray, fastapi, uvicorn, httpx" 2>/dev/null; then
    STEP_TIMEOUT=${SERVE_TIMEOUT:-420} run "${BAGEL[@]}" bench -w serve -m "$REPLICA_MODEL" --replicas 2 \
        --concurrency 1 --concurrency 8 --record "$OUT/work/rec"
else
    echo "== replica serve bench skipped: set REPLICA_MODEL and install ray" | tee -a "$OUT/log.txt"
fi
cp "$OUT/log.txt" "$OUT/log-copy.txt" 2>/dev/null && grep '^{"workload": "train"' "$OUT/log-copy.txt" > "$OUT/train.json"
rm -f "$OUT/log-copy.txt"
tar -C "$OUT" -czf "$OUT/records.tgz" work  # the device tool brings back few files: one archive
echo "done: $OUT"
