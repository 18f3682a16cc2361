#!/usr/bin/env bash
# Builds the wasm module and its ES-module bindings into www/pkg.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo build --release --lib --target wasm32-unknown-unknown
wasm-bindgen --target web --out-dir www/pkg --no-typescript "$CARGO_TARGET_DIR/wasm32-unknown-unknown/release/webgpu_lora.wasm"
echo "[wasm] www/pkg/webgpu_lora_bg.wasm: $(stat -c %s www/pkg/webgpu_lora_bg.wasm) bytes"
