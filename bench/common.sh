# Sourced first by the benchmark scripts (`source "$(dirname "$0")/common.sh"`): strict mode, the
# repository root as the working directory, the toolchain's environment, VENV (a Python with torch,
# transformers, peft, gguf and trl; scripts/bench.sh makes one) defaulting to .cache/bench-venv.
# `run CMD...` runs one benchmark and
# keeps the JSON line it prints last in `results` (a failure is reported and skipped); `train
# ARGS...` runs `cargo bench --bench training -- ARGS` as the CLI trains: with freed memory kept
# for reuse (glibc), except under gradient checkpointing, where the CLI leaves the allocator as it is.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh
VENV=${VENV:-.cache/bench-venv}
results=()
run() { echo "[bench] $*" >&2; local line; line=$("$@" | tail -n 1) && results+=("$line") || echo "[bench] failed: $*" >&2; }
train() {
  case " $* " in
    *" --gradient-checkpointing "*) run cargo bench --bench training -- "$@" ;;
    *) run env MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=1073741824 cargo bench --bench training -- "$@" ;;
  esac
}
