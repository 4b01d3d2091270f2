#!/usr/bin/env bash
# The test suite, as CI runs it: unit tests and the end-to-end tests across network namespaces.
# Needs root (namespaces, TUN devices); root-only tests FAIL instead of skipping because
# NIMBUS_REQUIRE_ROOT_TESTS=1.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -d "$HOME/.cargo/bin" ]] && export PATH="$HOME/.cargo/bin:$PATH"
command -v cargo >/dev/null 2>&1 || {
    echo "test.sh: cargo not found: install Rust with rustup (https://rustup.rs)" >&2
    exit 1
}
# The tests lint deploy/*.sh with the shellcheck package; probe_auth captures a latency probe with tcpdump; the
# storage tests partition, format and mount loop devices (sfdisk is in fdisk, mkfs.xfs in xfsprogs); the bootstrap
# tests check rendered cloud-configs with `cloud-init schema`; the packaging test runs `systemd-analyze verify`
# and `security` on the units; the .rpm test inspects and installs the packages with Debian's rpm; the store tests
# start a real etcd (etcd-server) on loopback.
./deploy/deps.sh shellcheck tcpdump fdisk xfsprogs e2fsprogs util-linux cloud-init systemd rpm etcd-server
# The helm chart test renders with Helm's Go SDK (PyPI helm-python-sdk, pinned) from a venv: create it once.
# Two lines on purpose: `export VAR=$(...)` would hide a failed install from `set -e`.
NIMBUS_HELM_PYTHON="$(./deploy/helm/install-renderer.sh)"
export NIMBUS_HELM_PYTHON
# A clean run gains nothing from incremental caches; they doubled the size of target/.
export CARGO_INCREMENTAL=0
df -h . | sed 's/^/test.sh: disk: /'
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The e2e tests start the real binaries from target/debug.
cargo build --workspace --bins --locked
# The .deb test packages that dev build with the pinned cargo-deb: install it (once, about 1.5 minutes) and
# build the packages here, so the test itself only inspects and installs them.
./packaging/build-deb.sh > /dev/null
# The same for the .rpm packages, with rpmbuild (Debian's rpm package).
./packaging/build-rpm.sh > /dev/null
NIMBUS_REQUIRE_ROOT_TESTS=1 cargo test --workspace --locked
df -h . | sed 's/^/test.sh: disk after the tests: /'
