#!/usr/bin/env bash
# `npm run bench:gpu`: what a GPU does with SmolLM2-135M-Instruct, in one call (a few minutes on a
# real GPU): the browser (headless Chromium, WebGPU) for f32, f16, q8_0 and the shipped GGUF
# (load, first forward, decode tokens/s, LoRA training tokens/s), and native wgpu decoding of the
# same four; prints one markdown table naming the adapters. On a CPU renderer (SwiftShader,
# lavapipe) it runs the same path with meaningless speeds: pass small NEW_TOKENS, TRAIN_STEPS=0
# (training 135M on a CPU renderer takes many minutes) and a longer BROWSER_TIMEOUT.
#
# Chromium reaches a real GPU headless through Vulkan; the flags below are the usual ones for a
# Linux GPU server (override with WEBGPU_LORA_CHROMIUM_FLAGS="" for a CPU renderer).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
NEW_TOKENS=${NEW_TOKENS:-32}
TRAIN_STEPS=${TRAIN_STEPS:-4}
export WEBGPU_LORA_CHROMIUM_FLAGS=${WEBGPU_LORA_CHROMIUM_FLAGS---ignore-gpu-blocklist --enable-features=Vulkan --use-angle=vulkan --use-vulkan=native}
MODEL=models/SmolLM2-135M-Instruct
lines=$(mktemp)
if [ -d lib/pkg ] && command -v node >/dev/null && [ -x "${CHROMIUM:-/usr/bin/chromium}" ]; then
  timeout "${BROWSER_TIMEOUT:-420}" node bench/gpu.mjs "$NEW_TOKENS" "$TRAIN_STEPS" >> "$lines" || echo "[bench:gpu] the browser run failed" >&2
else
  echo "[bench:gpu] no lib/pkg, node or Chromium here: browser rows skipped (build with scripts/build-wasm.sh)" >&2
fi
for base in "$MODEL f32" "$MODEL f16" "$MODEL q8_0" "$MODEL.Q4_1.gguf auto"; do
  set -- $base
  timeout 120 cargo bench --bench generation -- --model "$1" --backend wgpu --dtype "$2" --new-tokens "$NEW_TOKENS" --repeats 1 \
    | tail -n 1 >> "$lines" || echo "[bench:gpu] native wgpu $2 failed" >&2
done
python3 bench/report.py --gpu < "$lines"
