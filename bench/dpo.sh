#!/usr/bin/env bash
# The DPO section of BENCHMARKS.md (run by `npm run bench`; runnable alone, after `npm run build`):
# DPO steps of a new q,v r=8 adapter on SmolLM2-135M-Instruct (f32), 4 pairs of 2 x 128 random
# tokens a step, ours (`cargo bench --bench training -- --method dpo`) and TRL + PEFT
# (bench/trl_dpo_baseline.py) alternating twice: pairs/s and peak RSS. Writes .cache/bench-dpo.jsonl
# and prints the section. VENV: a Python with torch, transformers, peft and trl==1.16.0.
source "$(dirname "$0")/common.sh"
MODEL=models/SmolLM2-135M-Instruct
for _ in 1 2; do
  train --model "$MODEL" --targets qv --method dpo
  run "$VENV/bin/python" bench/trl_dpo_baseline.py "$MODEL" qv
done
mkdir -p .cache
printf '%s\n' "${results[@]}" > .cache/bench-dpo.jsonl
python3 bench/report.py --dpo "bash bench/dpo.sh" < .cache/bench-dpo.jsonl
