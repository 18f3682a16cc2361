#!/usr/bin/env bash
# Installs what is missing (scripts/setup.sh, passing its flags), builds the native CLI, fetches
# and converts the default model and fetches Gemma 3 270M. Shared first step of build, test and bench.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
bash scripts/setup.sh "$@"
cargo build --release --bin webgpu-lora
bash scripts/fetch-model.sh
bash scripts/fetch-gemma.sh
