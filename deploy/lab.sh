#!/usr/bin/env bash
# A local polynimbus lab: one coordinator and N agents, each in its own network namespace (underlay
# 198.51.100.0/24), in zones behind a userspace delay router (0.1 ms RTT inside a zone, 1 ms between zones a
# and b, 5 ms to the others), agents enrolled, connected through their WireGuard tunnels and measuring latency.
#
#   sudo ./deploy/lab.sh up [N [Z]]  install what is missing, build, start the lab (default 6 agents, 3 zones;
#                                    Z=0: one bridge, no delay)
#   sudo ./deploy/lab.sh status    the lab's processes and `nimbusctl nodes`
#   sudo ./deploy/lab.sh down      stop the lab and remove its namespaces (safe to repeat)
#
# The work is done by target/debug/nimbus-lab (tests/src/lab.rs), the same harness the end-to-end tests
# use. State lives in /run/nimbus-lab (state.json, data, logs, admin.sock).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO

usage() {
    cat <<USAGE
usage: sudo $0 up [AGENTS [ZONES]] | status | down

  up [AGENTS [ZONES]]  build everything and start a coordinator and AGENTS agents (default 6, at most 200)
               in ZONES zones behind the delay router (default 3, at most 26; 0: one bridge, no delay)
  status       show the lab's processes and \`nimbusctl nodes\`
  down         stop the lab and delete its namespaces (idempotent)
USAGE
}

die() {
    echo "lab.sh: $*" >&2
    exit 1
}

# --- arguments first: a typo never installs or builds anything --------------------------------------
cmd="${1:-}"
agents=6
zones=3
case "$cmd" in
    up)
        if [[ $# -gt 3 ]]; then usage >&2; exit 64; fi
        agents="${2:-6}"
        zones="${3:-3}"
        if ! [[ "$agents" =~ ^[0-9]+$ ]] || ((agents < 1 || agents > 200)); then
            echo "lab.sh: AGENTS must be a number from 1 to 200, got '$agents'" >&2
            exit 64
        fi
        if ! [[ "$zones" =~ ^[0-9]+$ ]] || ((zones > 26)); then
            echo "lab.sh: ZONES must be a number from 0 to 26, got '$zones'" >&2
            exit 64
        fi
        ;;
    down | status)
        if [[ $# -gt 1 ]]; then usage >&2; exit 64; fi
        ;;
    -h | --help | help)
        usage
        exit 0
        ;;
    *)
        usage >&2
        exit 64
        ;;
esac

if [[ "$(id -u)" -ne 0 ]]; then
    die "must run as root (it creates network namespaces and TUN devices): sudo $0 $*"
fi

# --- helpers -------------------------------------------------------------------------------------------

# The invoking user when run through sudo (builds run as them, so target/ stays theirs).
build_user() {
    if [[ -n "${SUDO_USER:-}" && "${SUDO_USER}" != "root" ]]; then
        echo "$SUDO_USER"
    fi
}

find_cargo() {
    local user home
    if command -v cargo >/dev/null 2>&1; then
        command -v cargo
        return 0
    fi
    user="$(build_user)"
    if [[ -n "$user" ]]; then
        home="$(getent passwd "$user" | cut -d: -f6)"
        if [[ -x "$home/.cargo/bin/cargo" ]]; then
            echo "$home/.cargo/bin/cargo"
            return 0
        fi
    fi
    if [[ -x /root/.cargo/bin/cargo ]]; then
        echo /root/.cargo/bin/cargo
        return 0
    fi
    return 1
}

install_packages() {
    "$REPO/deploy/deps.sh"
}

check_tun() {
    if [[ ! -c /dev/net/tun ]]; then
        modprobe tun 2>/dev/null || true
    fi
    [[ -c /dev/net/tun ]] || die "/dev/net/tun is missing: load the tun module (modprobe tun) or run on a host/VM that has it"
}

cargo_build() {
    local cargo user
    if ! cargo="$(find_cargo)"; then
        die "cargo not found. Install Rust with rustup (as your user, not root):
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh
then open a new shell and run this script again."
    fi
    user="$(build_user)"
    echo "lab.sh: cargo build $*"
    if [[ -n "$user" ]]; then
        # PATH so rustc/rustup proxies next to cargo are found; HOME so the user's toolchain is used.
        sudo -u "$user" -H env "PATH=$(dirname "$cargo"):$PATH" \
            ${CARGO_TARGET_DIR:+"CARGO_TARGET_DIR=$CARGO_TARGET_DIR"} \
            "$cargo" build --manifest-path "$REPO/Cargo.toml" "$@"
    else
        "$cargo" build --manifest-path "$REPO/Cargo.toml" "$@"
    fi
}

target_dir() {
    local t="${CARGO_TARGET_DIR:-$REPO/target}"
    [[ "$t" = /* ]] || t="$REPO/$t"
    echo "$t"
}

LAB_BIN="$(target_dir)/debug/nimbus-lab"
readonly LAB_BIN

ensure_lab_binary() {
    if [[ ! -x "$LAB_BIN" ]]; then
        cargo_build -p nimbus-e2e --bin nimbus-lab
    fi
}

# --- commands ------------------------------------------------------------------------------------------
case "$cmd" in
    up)
        # nimbus-lab refuses too; checking here saves a build. Keep in sync with DEFAULT_STATE_FILE.
        if [[ -e /run/nimbus-lab/state.json ]]; then
            die "a lab is already up (/run/nimbus-lab/state.json exists): run \`sudo $0 down\` first"
        fi
        install_packages
        check_tun
        cargo_build --workspace --bins
        exec "$LAB_BIN" up --agents "$agents" --zones "$zones"
        ;;
    down)
        ensure_lab_binary
        exec "$LAB_BIN" down
        ;;
    status)
        ensure_lab_binary
        exec "$LAB_BIN" status
        ;;
esac
