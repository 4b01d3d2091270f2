#!/usr/bin/env bash
# Install the Debian/Ubuntu packages that building and running polynimbus needs, plus any package names
# given as arguments. Idempotent: installs only what is missing. Needs root.
# Used by deploy/lab.sh and deploy/test.sh (the one list of build dependencies).
set -euo pipefail

PKGS=(protobuf-compiler libsystemd-dev pkg-config build-essential iproute2 iputils-ping procps "$@")

if [[ "$(id -u)" -ne 0 ]]; then
    echo "deps.sh: run as root (sudo) to install packages" >&2
    exit 1
fi
missing=()
for p in "${PKGS[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "deps.sh: missing packages: ${missing[*]} (no apt-get here: install them with your package manager)" >&2
        exit 1
    fi
    echo "deps.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
