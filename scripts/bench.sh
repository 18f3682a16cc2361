#!/usr/bin/env bash
# `npm run bench`: SmolLM2-135M-Instruct, ours (CPU backend, wgpu where it runs, and the browser)
# beside transformers/PEFT on the same machine in the same run: generation, adapter verbs,
# training, the JS API in headless Chromium, and the GPU work each asks for (dispatches and
# submissions, counted in Chromium); writes BENCHMARKS.md.
# transformers runs in a venv under .cache/bench-venv (created on first use: torch is large).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
bash scripts/prepare.sh --test
bash scripts/build-wasm.sh   # the browser benchmarks run the package's engine
MODEL=models/SmolLM2-135M-Instruct
NEW_TOKENS=${NEW_TOKENS:-64}
REPEATS=${REPEATS:-3}
VENV=.cache/bench-venv
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import transformers, torch, peft, gguf, trl' 2>/dev/null; then
  echo "[bench] creating $VENV with torch + transformers + peft + gguf + trl (pinned; a few GB, once)"
  python3 -m venv "$VENV"
  # gguf: transformers reading Gemma's GGUF (bench/gemma.sh); trl: the DPO baseline (bench/dpo.sh)
  "$VENV/bin/pip" install --quiet torch==2.15.0 transformers==5.24.0 peft==0.21.2 safetensors==0.8.0 numpy==2.4.6 gguf==0.19.0 trl==1.16.0
fi
source bench/common.sh
run cargo bench --bench generation -- --model "$MODEL" --backend cpu --new-tokens "$NEW_TOKENS" --repeats "$REPEATS"
run timeout 1200 cargo bench --bench generation -- --model "$MODEL" --backend wgpu --new-tokens "$NEW_TOKENS" --repeats "$REPEATS"
run "$VENV/bin/python" bench/transformers_baseline.py "$MODEL" "$NEW_TOKENS" "$REPEATS"
# adapter verbs: ours writes the adapters that PEFT then loads (which also checks PEFT reads our files)
ADAPTERS=.cache/bench-adapters
run cargo bench --bench adapters -- --model "$MODEL" --out "$ADAPTERS"
run "$VENV/bin/python" bench/peft_baseline.py "$MODEL" "$ADAPTERS"
# training: tokens/s and peak memory, ours beside PEFT, r=8 on q,v and on all-linear; ours and
# PEFT alternate $TRAIN_REPEATS times (this shared machine's speed drifts by +-20% within minutes)
# and the report takes medians
TRAIN_REPEATS=${TRAIN_REPEATS:-3}
for targets in qv all-linear; do
  for _ in $(seq "$TRAIN_REPEATS"); do
    train --model "$MODEL" --targets "$targets"
    run "$VENV/bin/python" bench/peft_train_baseline.py "$MODEL" "$targets"
  done
done
# where training runs on WebGPU shaders: native wgpu (lavapipe here) and the browser, small batches
run timeout 900 cargo bench --bench training -- --model "$MODEL" --targets qv --backend wgpu --batch 1 --seq 64 --steps 1
run timeout 900 node bench/browser_training.mjs 3
# the package's API in the browser: cold start, an adapter from IndexedDB, setAdapter, merge, decode
run timeout 900 node bench/browser_api.mjs "$ADAPTERS/qv" 4
# the raw lines too, to rebuild the report without rerunning: python3 bench/report.py CMD < FILE
printf '%s\n' "${results[@]}" > .cache/bench-results.jsonl
python3 bench/report.py "npm run bench" < .cache/bench-results.jsonl > BENCHMARKS.md
# quantized bases: the shipped GGUF and quantizing on load, beside f32 and transformers
echo >> BENCHMARKS.md
VENV="$VENV" bash bench/quantized.sh >> BENCHMARKS.md
# Gemma 3 270M from its GGUF, beside transformers and PEFT on the same file
echo >> BENCHMARKS.md
VENV="$VENV" bash bench/gemma.sh >> BENCHMARKS.md
# DPO beside TRL + PEFT
echo >> BENCHMARKS.md
VENV="$VENV" bash bench/dpo.sh >> BENCHMARKS.md
# full fine-tuning beside transformers'
echo >> BENCHMARKS.md
VENV="$VENV" bash bench/full.sh >> BENCHMARKS.md
# what a GPU would pay for: dispatches and submissions per token and per training step (counts)
echo >> BENCHMARKS.md
timeout 2400 node bench/gpu_work.mjs >> BENCHMARKS.md
cat BENCHMARKS.md
