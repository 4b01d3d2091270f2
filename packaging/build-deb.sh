#!/usr/bin/env bash
# Builds the .deb packages nimbus-agent and nimbus-coordinator (with nimbusctl) into target/debian/ from the
# dev build that CI already makes (`cargo build --workspace --bins`): no release build. Installs the pinned
# cargo-deb if it is missing. Prints the path of each package, one a line, on stdout.
#   packaging/build-deb.sh            # expects target/debug/{nimbus-agent,nimbus-coordinator,nimbusctl}
#   NIMBUS_DEB_BUILD=1 packaging/build-deb.sh   # builds those three binaries first
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DEB_VERSION=3.8.0

[[ -d "$HOME/.cargo/bin" ]] && export PATH="$HOME/.cargo/bin:$PATH"
command -v cargo >/dev/null 2>&1 || {
    echo "build-deb.sh: cargo not found: install Rust with rustup (https://rustup.rs)" >&2
    exit 1
}
if ! cargo deb --version 2>/dev/null | grep -qx "cargo-deb $CARGO_DEB_VERSION"; then
    echo "build-deb.sh: installing cargo-deb $CARGO_DEB_VERSION" >&2
    cargo install --locked --version "$CARGO_DEB_VERSION" cargo-deb >&2
fi

target_dir=${CARGO_TARGET_DIR:-target}
if [[ "${NIMBUS_DEB_BUILD:-0}" == 1 ]]; then
    cargo build --locked -p nimbus-agent -p nimbus-coordinator -p nimbusctl --bins >&2
fi
for bin in nimbus-agent nimbus-coordinator nimbusctl; do
    if [[ ! -x "$target_dir/debug/$bin" ]]; then
        echo "build-deb.sh: $target_dir/debug/$bin is missing: run cargo build --workspace --bins" \
            "(or set NIMBUS_DEB_BUILD=1)" >&2
        exit 1
    fi
done

mkdir -p "$target_dir/debian"
for pkg in nimbus-agent nimbus-coordinator; do
    # --profile dev: the assets' target/release/ paths mean target/debug/ (cargo-deb warns that it prefers
    # release builds). --no-strip: cargo-deb's own stripping takes minutes on a dev binary; the dev profile
    # keeps line tables only, so the packages stay small (10-20 MB) with --fast compression, in seconds.
    cargo deb --locked -p "$pkg" --profile dev --no-build --no-strip --fast --output "$target_dir/debian/" \
        | tail -n 1
done
