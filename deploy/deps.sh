#!/usr/bin/env bash
# Install what building and running polynimbus needs on Debian/Ubuntu.
# Idempotent: installs only the packages that are missing. Needs root.
set -euo pipefail

PKGS=(protobuf-compiler libsystemd-dev pkg-config build-essential iproute2 iputils-ping procps)

if [ "$(id -u)" -ne 0 ]; then
  echo "deps.sh: run as root (sudo) to install packages" >&2
  exit 1
fi
missing=()
for p in "${PKGS[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "deps.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if ! command -v cargo >/dev/null 2>&1; then
  for c in "$HOME/.cargo/bin/cargo" /root/.cargo/bin/cargo /usr/local/cargo/bin/cargo; do
    [ -x "$c" ] && exit 0
  done
  echo "deps.sh: cargo not found: install Rust with https://rustup.rs (curl --proto '=https' -sSf https://sh.rustup.rs | sh)" >&2
  exit 1
fi
