#!/usr/bin/env bash
# The GPU measurements issue 6 asks for, as prepared runs on one H100/H200 (torch, timm, onnxruntime
# preinstalled there; no kfp, no network), from the repo root:
#   bash tools/gpu_check.sh bench      # ~8 min: 128 px and 384->224 loops vs baselines, K students, CUDA graphs
#   bash tools/gpu_check.sh loader     # ~3 min: JPEG streaming loader img/s by workers, nvJPEG, streamed 224 loop
#   bash tools/gpu_check.sh repro      # 8 min slice of the GPU-size teaching-setups grid (3 seeds x 16 cells, far
#                                      # longer in all): runs.jsonl keeps finished runs, a rerun resumes
# JSON and logs go to $OUT (or runs/gpu). Then copy the figures into docs/performance.md and
# docs/reproduction.md.
set -u
export PYTHONPATH=. HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
out=${OUT:-runs/gpu}
mkdir -p "$out"
fm() { timeout "$1" python -m funmatch "${@:2}"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
nproc | tee -a "$out/gpu.txt"
case "${1:-bench}" in
bench)
  # 128 px, BiT-R152x2 -> BiT-R50, batch 512 (paper small-dataset setting), with one more student
  # (K=2: the cost of K students vs K runs is loop img/s of K=1 over K=2), then with CUDA graphs
  fm 200 bench distill --preset flowers102-fast --set runtime.compile=true --steps 30 --json "$out/bench128.json" 2>&1 | tail -n 7
  fm 120 bench distill --preset flowers102-fast --set runtime.compile=true --steps 20 --no-compile-baseline \
    --set distill.extra_students=bit-r50x1@128 --json "$out/bench128-k2.json" 2>&1 | tail -n 7
  fm 120 bench distill --preset flowers102-fast --set runtime.compile=true --set runtime.compile_mode=reduce-overhead \
    --steps 30 --no-compile-baseline --json "$out/bench128-graphs.json" 2>&1 | tail -n 7
  # which lines of the step make the host wait on the GPU (expected: only the log step's loss read-back)
  fm 90 bench distill --preset flowers102-fast --set distill.batch_size=128 --set runtime.sync_debug=true --steps 5 \
    --no-compile-baseline 2>&1 | grep -B1 -A2 -i "synchroniz" | head -n 24
  # 384 -> 224, BiT-R152x2 -> BiT-R50 (ImageNet headline setting), batch 256
  fm 200 bench distill --preset imagenet-t384-s224 --set distill.batch_size=256 --set runtime.compile=true --steps 15 \
    --json "$out/bench384.json" 2>&1 | tail -n 7
  ;;
loader)
  # the streaming loader alone: 256 px JPEG shards, batch 256, workers 1..15, then nvJPEG on the GPU
  fm 120 bench loader --preset imagenet --images 4096 --workers 1,4,8,15 --steps 32 --json "$out/loader.json" 2>&1 | tail -n 7
  fm 60 bench loader --preset imagenet --images 4096 --workers 2 --decode device --steps 32 \
    --json "$out/loader-nvjpeg.json" 2>&1 | tail -n 4
  # the 384 -> 224 loop fed by streamed JPEG shards instead of the resident split
  fm 200 bench distill --preset imagenet-t384-s224 --set distill.batch_size=256 --set runtime.compile=true --steps 15 \
    --set data.encoding=jpeg --set runtime.resident_max_gb=0 --no-compile-baseline --json "$out/bench384-stream.json" 2>&1 | tail -n 7
  ;;
repro)
  fm 480 experiment teaching-setups --size gpu --output "$out/teaching-setups" 2>&1 | tail -n 14
  ;;
*) echo "usage: bash tools/gpu_check.sh bench|loader|repro" >&2; exit 2 ;;
esac
