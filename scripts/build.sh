#!/usr/bin/env bash
# Installs what is missing, builds the native CLI and the wasm module, fetches and converts the
# model, and writes the static site (dist/site).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
bash scripts/prepare.sh
bash scripts/build-wasm.sh
bash scripts/build-site.sh
