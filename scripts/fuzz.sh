#!/usr/bin/env bash
# The long fuzzing run (tests/fuzz.rs): every parser of untrusted bytes, WEBGPU_LORA_FUZZ_EXECS
# mutated inputs each (default 1,000,000; `npm test` runs 1,500 each). Stable Rust, no nightly.
# WEBGPU_LORA_FUZZ_ONLY=<target> runs one; a failure prints how to replay it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export WEBGPU_LORA_FUZZ_EXECS=${WEBGPU_LORA_FUZZ_EXECS:-1000000}
cargo test --release --test fuzz -- --nocapture
