#!/usr/bin/env bash
# Writes the site as plain files for any static host into dist/site: www/ (the playground and the
# course), the package (lib/, with the built wasm) under lib/, and the sample dataset under data/.
# Models are not copied: put the default, SmolLM2-135M-Instruct.Q4_1.gguf, or a converted model under
# dist/site/models/, or load a URL.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f lib/pkg/webgpu_lora_bg.wasm ] || { echo "lib/pkg is not built: run npm run build" >&2; exit 1; }
rm -rf dist/site
mkdir -p dist/site/lib/pkg dist/site/data
cp -r www/. dist/site/
cp lib/index.js lib/messages.js lib/store.js lib/worker.js dist/site/lib/
cp lib/pkg/webgpu_lora.js lib/pkg/webgpu_lora_bg.wasm dist/site/lib/pkg/
cp -r data/robot data/robot-completions data/robot-preferences dist/site/data/
echo "[site] dist/site: $(du -sh dist/site | cut -f1) (serve it with any static server; WebGPU needs https or localhost)"
