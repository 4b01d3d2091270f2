#!/usr/bin/env bash
# Builds the .rpm packages nimbus-agent and nimbus-coordinator (with nimbusctl) into target/generate-rpm/ from the
# dev build that CI already makes (`cargo build --workspace --bins`): no release build. Needs rpmbuild (Debian:
# the rpm package) and python3; nothing is downloaded. Prints the path of each package, one a line, on stdout.
#   packaging/build-rpm.sh            # expects target/debug/{nimbus-agent,nimbus-coordinator,nimbusctl}
#   NIMBUS_RPM_BUILD=1 packaging/build-rpm.sh   # builds those three binaries first
# What each package holds is packaging/rpm/<package>.spec; how rpmbuild builds them, packaging/rpm/macros. The
# scriptlets are packaging/rpm/<package>/{pre,post,preun,postun} with packaging/rpm/functions.sh put in place of
# their `. "${NIMBUS_RPM_FUNCTIONS...}"` line (rpm stores each scriptlet as one text); the assembled copies are
# in target/generate-rpm/scriptlets/, from where the spec files read them (`%post -f`).
set -euo pipefail
cd "$(dirname "$0")/.."

[[ -d "$HOME/.cargo/bin" ]] && export PATH="$HOME/.cargo/bin:$PATH"
command -v cargo >/dev/null 2>&1 || {
    echo "build-rpm.sh: cargo not found: install Rust with rustup (https://rustup.rs)" >&2
    exit 1
}
command -v rpmbuild >/dev/null 2>&1 || {
    echo "build-rpm.sh: rpmbuild not found: install rpm (Debian: apt-get install rpm)" >&2
    exit 1
}
command -v python3 >/dev/null 2>&1 || {
    echo "build-rpm.sh: python3 not found (it reads the crate versions from cargo metadata):" \
        "install python3 (Debian: apt-get install python3)" >&2
    exit 1
}

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

# The scanner that lists the binaries' libraries as Requires (packaging/rpm/macros).
if [[ ! -x /usr/lib/rpm/elfdeps ]]; then
    echo "build-rpm.sh: /usr/lib/rpm/elfdeps is missing: install rpm (Debian: apt-get install rpm)" >&2
    exit 1
fi

out="$target_dir/generate-rpm"
mkdir -p "$out"
out=$(cd "$out" && pwd)
bindir=$(cd "$target_dir/debug" && pwd)
# rpm expands % in macro values, and the spec files' shell lines split at whitespace of a value.
for path in "$PWD" "$out" "$bindir"; do
    if [[ "$path" =~ [[:space:]%] ]]; then
        echo "build-rpm.sh: $path: rpmbuild cannot work with a path holding whitespace or %:" \
            "move the checkout (or CARGO_TARGET_DIR) to a plain path" >&2
        exit 1
    fi
done

# Version, license and homepage of both crates as Cargo.toml says (version.workspace = true resolved), a tab
# between them ("-" for none): a license may hold spaces ("MIT OR Apache-2.0").
declare -A version license homepage
metadata=$(cargo metadata --no-deps --format-version 1 | python3 -c '
import json, sys
for p in json.load(sys.stdin)["packages"]:
    print("\t".join([p["name"], p["version"], p["license"] or "-", p["homepage"] or "-"]))
') || {
    echo "build-rpm.sh: cargo metadata failed (its message is above): fix the Cargo.toml it names" >&2
    exit 1
}
while IFS=$'\t' read -r name ver lic home; do
    version[$name]=$ver license[$name]=$lic homepage[$name]=$home
done <<<"$metadata"

functions=packaging/rpm/functions.sh
topdir="$out/rpmbuild"
for pkg in nimbus-agent nimbus-coordinator; do
    if [[ -z "${version[$pkg]:-}" || "${license[$pkg]}" == - ]]; then
        echo "build-rpm.sh: cargo metadata gives no version and license for $pkg:" \
            "set version and license in its Cargo.toml" >&2
        exit 1
    fi

    # Each scriptlet with the functions inlined, where the spec file's `%<phase> -f <package>/<phase>` finds it.
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
    done

    rm -f "$out/$pkg"-[0-9]*.rpm
    rm -rf "$topdir"
    mkdir -p "$topdir/tmp"
    defines=(
        --define "_topdir $topdir"
        --define "_builddir $out/scriptlets"
        --define "_rpmdir $out"
        # rpmbuild opens an rpm database (Debian's default is ~/.rpmdb): a throwaway one.
        --define "_dbpath $topdir/db"
        --define "_tmppath $topdir/tmp"
        --define "nimbus_workspace $PWD"
        --define "nimbus_bindir $bindir"
        # rpm forbids - in a version; ~ sorts first, as a semver pre-release does: 1.0.0-rc.1 is 1.0.0~rc.1.
        --define "nimbus_version ${version[$pkg]//-/\~}"
        --define "nimbus_license ${license[$pkg]}"
    )
    [[ "${homepage[$pkg]}" == - ]] || defines+=(--define "nimbus_url ${homepage[$pkg]}")
    if ! rpmbuild -bb --quiet --load packaging/rpm/macros "${defines[@]}" "packaging/rpm/$pkg.spec" >&2; then
        echo "build-rpm.sh: rpmbuild failed for packaging/rpm/$pkg.spec (its messages are above)" >&2
        exit 1
    fi
    rm -rf "$topdir"
    built=("$out/$pkg"-[0-9]*.rpm)
    if [[ ! -f "${built[0]}" ]]; then
        echo "build-rpm.sh: rpmbuild wrote no $out/$pkg-*.rpm" >&2
        exit 1
    fi
    echo "${built[0]#"$PWD/"}"
done
