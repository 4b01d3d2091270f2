#!/usr/bin/env bash
# The test suite, as CI runs it: unit tests and the end-to-end tests across
# network namespaces. Needs root (namespaces, TUN devices); root-only tests
# FAIL instead of skipping because NIMBUS_REQUIRE_ROOT_TESTS=1.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d "$HOME/.cargo/bin" ] && export PATH="$HOME/.cargo/bin:$PATH"
./deploy/deps.sh
# The e2e tests start the real binaries from target/debug.
cargo build --workspace --bins --locked
NIMBUS_REQUIRE_ROOT_TESTS=1 cargo test --workspace --locked -- --test-threads=2
