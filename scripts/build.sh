#!/usr/bin/env bash
# Installs what is missing, builds the native CLI and the wasm module, fetches and converts the model.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
bash scripts/setup.sh
cargo build --release --bin webgpu-lora
bash scripts/fetch-model.sh
bash scripts/build-wasm.sh
