#!/usr/bin/env bash
# `npm test`: the whole suite. Installs what is missing (Chromium included), builds, fetches the
# model, then runs the native tests (CPU and wgpu backends) and the browser tests (headless Chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
bash scripts/prepare.sh --test
echo "[test] native tests (cargo test --release)"
# one test at a time: the wgpu tests share one device, and the real-model tests are memory-heavy
cargo test --release -- --test-threads=1
bash scripts/build-wasm.sh
echo "[test] browser tests (headless Chromium, WebGPU)"
node --test --test-concurrency=1 tests/browser/
