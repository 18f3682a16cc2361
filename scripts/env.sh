# Sourced by the other scripts: where builds go. The target directory lives outside the clone so
# that a machine that built once (a developer's, CI's) reuses it; a cold one simply builds.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/webgpu-lora/target}
export WEBGPU_LORA_BIN=${WEBGPU_LORA_BIN:-$CARGO_TARGET_DIR/release/webgpu-lora}
# wgpu (native tests) needs a writable runtime dir
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp/webgpu-lora-runtime}
mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
