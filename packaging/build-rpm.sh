#!/usr/bin/env bash
# Builds the .rpm packages nimbus-agent and nimbus-coordinator (with nimbusctl) into target/generate-rpm/ from the
# dev build that CI already makes (`cargo build --workspace --bins`): no release build. Installs the pinned
# cargo-generate-rpm if it is missing. Prints the path of each package, one a line, on stdout.
#   packaging/build-rpm.sh            # expects target/debug/{nimbus-agent,nimbus-coordinator,nimbusctl}
#   NIMBUS_RPM_BUILD=1 packaging/build-rpm.sh   # builds those three binaries first
# The scriptlets are packaging/rpm/<package>/{pre,post,preun,postun} with packaging/rpm/functions.sh put in place
# of their `. "${NIMBUS_RPM_FUNCTIONS...}"` line (rpm stores each scriptlet as one text); the assembled copies
# are in target/generate-rpm/scriptlets/.
set -euo pipefail
cd "$(dirname "$0")/.."

# The newest release that builds with our Rust (1.95); `cargo install` takes about 4.5 minutes on 2 cores.
CARGO_GENERATE_RPM_VERSION=0.21.1

[[ -d "$HOME/.cargo/bin" ]] && export PATH="$HOME/.cargo/bin:$PATH"
command -v cargo >/dev/null 2>&1 || {
    echo "build-rpm.sh: cargo not found: install Rust with rustup (https://rustup.rs)" >&2
    exit 1
}
if ! cargo generate-rpm --version 2>/dev/null | grep -qx "cargo-generate-rpm $CARGO_GENERATE_RPM_VERSION"; then
    echo "build-rpm.sh: installing cargo-generate-rpm $CARGO_GENERATE_RPM_VERSION" >&2
    cargo install --locked --version "$CARGO_GENERATE_RPM_VERSION" cargo-generate-rpm >&2
fi

target_dir=${CARGO_TARGET_DIR:-target}
if [[ "${NIMBUS_RPM_BUILD:-0}" == 1 ]]; then
    cargo build --locked -p nimbus-agent -p nimbus-coordinator -p nimbusctl --bins >&2
fi
for bin in nimbus-agent nimbus-coordinator nimbusctl; do
    if [[ ! -x "$target_dir/debug/$bin" ]]; then
        echo "build-rpm.sh: $target_dir/debug/$bin is missing: run cargo build --workspace --bins" \
            "(or set NIMBUS_RPM_BUILD=1)" >&2
        exit 1
    fi
done

if [[ ! -x /usr/lib/rpm/find-requires ]]; then
    echo "build-rpm.sh: /usr/lib/rpm/find-requires is missing: install rpm (Debian: apt-get install rpm)" >&2
    exit 1
fi

out="$target_dir/generate-rpm"
mkdir -p "$out"
out=$(cd "$out" && pwd)
functions=packaging/rpm/functions.sh
declare -A field=(
    [pre]=pre_install_script [post]=post_install_script
    [preun]=pre_uninstall_script [postun]=post_uninstall_script
)
for pkg in nimbus-agent nimbus-coordinator; do
    # Each scriptlet with the functions inlined, handed to cargo-generate-rpm in place of the source file that
    # Cargo.toml names (-s overrides that key).
    overrides=()
    mkdir -p "$out/scriptlets/$pkg"
    for phase in pre post preun postun; do
        src="packaging/rpm/$pkg/$phase"
        [[ -f "$src" ]] || continue
        dest="$out/scriptlets/$pkg/$phase"
        awk -v functions="$functions" '
            /^\. "\$\{NIMBUS_RPM_FUNCTIONS:\?/ {
                print "# ---- " functions " ----"
                while ((getline line < functions) > 0) print line
                close(functions)
                print "# ---- end of " functions " ----"
                found = 1
                next
            }
            /^# shellcheck source=/ { next }
            { print }
            END { if (!found) exit 1 }
        ' "$src" > "$dest" || {
            echo "build-rpm.sh: $src does not source the functions with" \
                "'. \"\${NIMBUS_RPM_FUNCTIONS:?...}\"'" >&2
            exit 1
        }
        if [[ "$dest" == *"'"* ]]; then
            echo "build-rpm.sh: $dest: a path with ' cannot be passed to cargo generate-rpm" >&2
            exit 1
        fi
        overrides+=(-s "${field[$phase]} = '$dest'")
    done
    rm -f "$out/$pkg"-[0-9]*.rpm
    # --profile dev: the assets' target/release/ paths mean target/debug/. --auto-req find-requires: rpm's own
    # ELF scanner, which lists the libraries the binaries link directly with their symbol versions (libc.so.6
    # (GLIBC_2.34), libsystemd.so.0, ...); the builtin ldd scan would also list libsystemd's own libraries as
    # Debian builds it. cargo-generate-rpm does not strip: the dev profile keeps line tables only; gzip (level 9,
    # about 6 s, 10-30 MB) rather than the default zstd, whose level 19 takes over a minute here.
    cargo generate-rpm -p "${pkg#nimbus-}" --profile dev --auto-req find-requires --payload-compress gzip \
        -o "$out/" "${overrides[@]}" >&2
    built=("$out/$pkg"-[0-9]*.rpm)
    if [[ ! -f "${built[0]}" ]]; then
        echo "build-rpm.sh: cargo generate-rpm wrote no $out/$pkg-*.rpm" >&2
        exit 1
    fi
    echo "${built[0]#"$PWD/"}"
done
