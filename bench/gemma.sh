#!/usr/bin/env bash
# The Gemma 3 270M section of BENCHMARKS.md (run by `npm run bench`; runnable alone, after
# `npm run build`): the shipped Q4_K_M GGUF (scripts/fetch-gemma.sh) on the CPU backend beside
# transformers loading the same GGUF (dequantized to f32) in the same run: bytes on the device,
# load, prefill and decode tokens/s; LoRA training (q,v r=8, batch 4 x 128) beside PEFT on that
# f32 model: tokens/s and peak RSS. Writes .cache/bench-gemma.jsonl and prints the section.
# VENV: a Python with torch + transformers + peft + gguf (scripts/bench.sh makes one).
source "$(dirname "$0")/common.sh"
GGUF=models/gemma-3-270m-q4_k_m.gguf
NEW_TOKENS=${NEW_TOKENS:-64}
REPEATS=${REPEATS:-3}
run cargo bench --bench generation -- --backend cpu --model "$GGUF" --new-tokens "$NEW_TOKENS" --repeats "$REPEATS"
run "$VENV/bin/python" bench/transformers_baseline.py "$GGUF" "$NEW_TOKENS" "$REPEATS"
train --model "$GGUF" --targets qv
train --model "$GGUF" --targets qv --gradient-checkpointing
run "$VENV/bin/python" bench/peft_train_baseline.py "$GGUF" qv
mkdir -p .cache
printf '%s\n' "${results[@]}" > .cache/bench-gemma.jsonl
python3 bench/report.py --gemma "bash bench/gemma.sh" < .cache/bench-gemma.jsonl
