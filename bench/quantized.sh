#!/usr/bin/env bash
# The quantized-base section of BENCHMARKS.md (run by `npm run bench`; runnable alone, after
# `npm run build`): SmolLM2-135M-Instruct on the CPU backend as f32, as the shipped GGUF (Q4_1
# layers, Q8_0 embedding) and quantized on load (q8_0, q4_0): bytes on the device, prefill and
# decode tokens/s beside transformers f32 in the same run; LoRA training (q,v r=8, batch 4 x 128)
# on a Q4_0 base beside our f32 run, with and without gradient checkpointing: tokens/s and peak RSS. Writes .cache/bench-quantized.jsonl and
# prints the section. VENV: a Python with torch + transformers (scripts/bench.sh makes one).
source "$(dirname "$0")/common.sh"
MODEL=models/SmolLM2-135M-Instruct
GGUF=models/SmolLM2-135M-Instruct.Q4_1.gguf
NEW_TOKENS=${NEW_TOKENS:-64}
REPEATS=${REPEATS:-3}
gen() { run cargo bench --bench generation -- --backend cpu --new-tokens "$NEW_TOKENS" --repeats "$REPEATS" "$@"; }
gen --model "$MODEL" --dtype f32
gen --model "$GGUF"
gen --model "$MODEL" --dtype q8_0
gen --model "$MODEL" --dtype q4_0
run "$VENV/bin/python" bench/transformers_baseline.py "$MODEL" "$NEW_TOKENS" "$REPEATS"
for _ in 1 2; do
  for checkpointing in "" --gradient-checkpointing; do
    train --targets qv --model "$MODEL" --dtype f32 $checkpointing
    train --targets qv --model "$MODEL" --dtype q4_0 $checkpointing
    train --targets qv --model "$GGUF" $checkpointing
  done
done
mkdir -p .cache
printf '%s\n' "${results[@]}" > .cache/bench-quantized.jsonl
python3 bench/report.py --quantized "bash bench/quantized.sh" < .cache/bench-quantized.jsonl
