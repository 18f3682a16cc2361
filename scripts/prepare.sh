#!/usr/bin/env bash
# Installs what is missing (scripts/setup.sh, passing its flags), builds the native CLI, and fetches
# and converts the default model. Shared first step of build, test and bench.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
bash scripts/setup.sh "$@"
cargo build --release --bin webgpu-lora
bash scripts/fetch-model.sh
