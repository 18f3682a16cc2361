#!/usr/bin/env bash
# `npm start`: build everything that is missing, then serve the demo at http://127.0.0.1:8080
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
exec node scripts/serve.mjs --port "${PORT:-8080}"
