#!/usr/bin/env bash
# Installs what nimbus-bench needs, builds it (and the daemons) in release, and runs it with the given args.
#   sudo bench/run.sh                         # every section (under 10 minutes)
#   sudo bench/run.sh --only tunnel --quick   # one section, short runs
# Needs root (network namespaces, TUN). Idempotent: installed tools are skipped.
set -euo pipefail

BORINGTUN_CLI_VERSION=0.7.1
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "run.sh: needs root (network namespaces, TUN devices); run it with sudo" >&2
    exit 1
fi

missing=()
command -v iperf3 >/dev/null || missing+=(iperf3)
command -v wireguard-go >/dev/null || missing+=(wireguard-go)
command -v wg >/dev/null || missing+=(wireguard-tools)
command -v ping >/dev/null || missing+=(iputils-ping)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "run.sh: installing ${missing[*]}" >&2
    apt-get update -q
    # --no-install-recommends: wireguard-tools recommends a kernel image, which the bench does not need.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
if ! command -v boringtun-cli >/dev/null && [ ! -x "$cargo_bin/boringtun-cli" ]; then
    echo "run.sh: installing boringtun-cli $BORINGTUN_CLI_VERSION (takes a few minutes)" >&2
    cargo install --locked boringtun-cli --version "$BORINGTUN_CLI_VERSION"
fi
export PATH="$PATH:$cargo_bin"

# The agent-footprint section measures the release daemons (what operators run).
cargo build --release -p nimbus-bench -p nimbus-agent -p nimbus-coordinator -p nimbusctl
build_secs=$SECONDS
status=0
"${CARGO_TARGET_DIR:-target}/release/nimbus-bench" "$@" || status=$?
echo "run.sh: total $((SECONDS / 60)) min $((SECONDS % 60)) s (build and tool installs $build_secs s, measurements $((SECONDS - build_secs)) s)" >&2
exit "$status"
