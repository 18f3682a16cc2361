#!/usr/bin/env bash
# The full fine-tuning section of BENCHMARKS.md (run by `npm run bench`; runnable alone, after
# `npm run build`): every weight of SmolLM2-135M-Instruct (f32) trained, batches of 4 x 128 random
# tokens, AdamW lr 2e-4; ours (`cargo bench --bench training -- --method full`, with and without
# gradient checkpointing) and transformers' full fine-tuning (bench/peft_train_baseline.py full)
# alternating twice: tokens/s and peak RSS. Writes .cache/bench-full.jsonl and prints the section.
# VENV: a Python with torch and transformers (and peft).
source "$(dirname "$0")/common.sh"
MODEL=models/SmolLM2-135M-Instruct
for _ in 1 2; do
  for checkpointing in "" --gradient-checkpointing; do
    train --model "$MODEL" --method full $checkpointing
  done
  run "$VENV/bin/python" bench/peft_train_baseline.py "$MODEL" full
done
mkdir -p .cache
printf '%s\n' "${results[@]}" > .cache/bench-full.jsonl
python3 bench/report.py --full "bash bench/full.sh" < .cache/bench-full.jsonl
