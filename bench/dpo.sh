#!/usr/bin/env bash
# The DPO section of BENCHMARKS.md (run by `npm run bench`; runnable alone, after `npm run build`):
# DPO steps of a new q,v r=8 adapter on SmolLM2-135M-Instruct (f32), 4 pairs of 2 x 128 random
# tokens a step, ours (`cargo bench --bench training -- --method dpo`) and TRL + PEFT
# (bench/trl_dpo_baseline.py) alternating twice: pairs/s and peak RSS. Writes .cache/bench-dpo.jsonl
# and prints the section. VENV: a Python with torch, transformers, peft and trl==1.16.0.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
MODEL=models/SmolLM2-135M-Instruct
VENV=${VENV:-.cache/bench-venv}
results=()
run() { echo "[bench] $*" >&2; local line; line=$("$@" | tail -n 1) && results+=("$line") || echo "[bench] failed: $*" >&2; }
for _ in 1 2; do
  # as the CLI trains: freed memory kept for reuse (glibc)
  run env MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=1073741824 cargo bench --bench training -- --model "$MODEL" --targets qv --method dpo
  run "$VENV/bin/python" bench/trl_dpo_baseline.py "$MODEL" qv
done
mkdir -p .cache
printf '%s\n' "${results[@]}" > .cache/bench-dpo.jsonl
python3 bench/report.py --dpo "bash bench/dpo.sh" < .cache/bench-dpo.jsonl
