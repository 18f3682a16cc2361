#!/usr/bin/env bash
# Builds the wasm module and its ES-module bindings into lib/pkg (the npm package's engine).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo build --release --lib --target wasm32-unknown-unknown
wasm-bindgen --target web --out-dir lib/pkg --no-typescript "$CARGO_TARGET_DIR/wasm32-unknown-unknown/release/webgpu_lora.wasm"
echo "[wasm] lib/pkg/webgpu_lora_bg.wasm: $(stat -c %s lib/pkg/webgpu_lora_bg.wasm) bytes, $(gzip -c lib/pkg/webgpu_lora_bg.wasm | wc -c) gzipped"
