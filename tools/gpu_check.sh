#!/usr/bin/env bash
# The GPU measurements issue 6 asks for, as one prepared run (about 10 minutes on one H100/H200).
# On the lent GPU machine (torch, timm, onnxruntime preinstalled; no kfp, no network), from the repo root:
#   bash tools/gpu_check.sh            # writes JSON and logs under $OUT (or runs/gpu)
# Then copy the figures into docs/performance.md and docs/reproduction.md.
set -u
export PYTHONPATH=. HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
out=${OUT:-runs/gpu}
mkdir -p "$out"
fm() { timeout "$1" python -m funmatch.cli "${@:2}"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
# 128 px, BiT-R152x2 -> BiT-R50, batch 512 (paper small-dataset setting): loop vs naive and compile baselines
fm 240 bench distill --preset flowers102-fast --set runtime.compile=true --steps 30 --json "$out/bench128.json" 2>&1 | tail -n 8
# 384 -> 224, BiT-R152x2 -> BiT-R50 (ImageNet headline setting), batch 256
fm 240 bench distill --preset imagenet-t384-s224 --set distill.batch_size=256 --set runtime.compile=true --steps 15 \
  --json "$out/bench384.json" 2>&1 | tail -n 8
# The teaching-setups reproduction, GPU size
fm 480 experiment teaching-setups --size gpu --output "$out/teaching-setups" 2>&1 | tail -n 14
