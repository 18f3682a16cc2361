#!/usr/bin/env bash
# `npm test`: the whole suite. Installs what is missing (Chromium included), builds, fetches the
# model, then checks the formatting and runs the native tests (CPU and wgpu backends; the
# layering test among them) and the browser tests (headless Chromium; the index.d.ts check among them).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
bash scripts/prepare.sh --test
echo "[test] formatting (cargo fmt --check, rustfmt.toml)"
cargo fmt --check
echo "[test] native tests (cargo test --release)"
# one test at a time: the wgpu tests share one device, and the real-model tests are memory-heavy
cargo test --release -- --test-threads=1
echo "[test] the benchmarks still build (cargo bench --no-run)"
cargo bench --no-run
bash scripts/build-wasm.sh
echo "[test] browser tests (headless Chromium, WebGPU)"
# the files named (a glob the shell expands): Node 20 and Node 22+ treat a directory argument differently
node --test --test-concurrency=1 tests/browser/*.test.mjs
