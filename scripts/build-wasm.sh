#!/usr/bin/env bash
# Builds the wasm module (Cargo profile `wasm`: opt-level "s", fat LTO) and its ES-module bindings
# into lib/pkg (the npm package's engine), then shrinks it with wasm-opt (binaryen from the npm
# registry: node_modules/.bin, no other download). -O1 takes ~1 minute here; -Os and -Oz took 3 to
# 6 times as long and gave a larger gzipped file (BENCHMARKS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo build --profile wasm --lib --target wasm32-unknown-unknown
wasm-bindgen --target web --out-dir lib/pkg --no-typescript "$CARGO_TARGET_DIR/wasm32-unknown-unknown/wasm/webgpu_lora.wasm"
wasm=lib/pkg/webgpu_lora_bg.wasm
raw=$(stat -c %s "$wasm")
# the features rustc's wasm32 target enables by default (Rust >= 1.82), so wasm-opt may keep them
node_modules/.bin/wasm-opt -O1 --strip-debug --strip-producers \
  --enable-bulk-memory --enable-nontrapping-float-to-int --enable-sign-ext --enable-mutable-globals \
  --enable-reference-types --enable-multivalue "$wasm" -o "$wasm.opt"
mv "$wasm.opt" "$wasm"
echo "[wasm] $wasm: $raw bytes from wasm-bindgen, $(stat -c %s "$wasm") after wasm-opt -O1, $(gzip -9 -c "$wasm" | wc -c) gzipped (gzip -9)"
