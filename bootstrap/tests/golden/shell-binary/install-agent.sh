#!/bin/sh
# polynimbus: installs the nimbus-agent and enrolls this host. Rendered by nimbus-bootstrap.
# Idempotent: once the agent is installed and enabled, running it again changes nothing.
# SECRET: holds a single-use join token (id abcdefghij) valid until 2026-05-01T12:00:00Z (1h after minting). Keep it private until the host has enrolled; it is useless afterwards.
set -eu
umask 022
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

log() {
    printf 'nimbus-bootstrap: %s\n' "$*" >&2
}

# put PATH MODE < CONTENT: installs CONTENT at PATH with MODE. A file that already holds it is left alone, and
# so is its directory: the comparison happens in a private scratch directory.
put() {
    (umask 077 && cat > "$scratch/new")
    if [ -f "$1" ] && [ "$(sha256sum < "$scratch/new")" = "$(sha256sum < "$1")" ]; then
        if [ "$(stat -c %a "$1")" != "${2#0}" ]; then
            chmod "$2" "$1"
        fi
    else
        mkdir -p "$(dirname "$1")"
        rm -f "$1.nimbus-new"
        (umask 077 && cat "$scratch/new" > "$1.nimbus-new")
        chmod "$2" "$1.nimbus-new"
        mv -f "$1.nimbus-new" "$1"
        log "wrote $1"
    fi
    rm -f "$scratch/new"
}

# download FILE: fetches the package to FILE and checks its SHA-256; a mismatch stops the script.
download() {
    mkdir -p "$(dirname "$1")"
    rm -f "$1.part"
    log "downloading $package_url"
    curl --fail --silent --show-error --location --retry 5 --output "$1.part" "$package_url"
    if ! printf '%s  %s\n' "$package_sha256" "$1.part" | sha256sum -c -; then
        rm -f "$1.part"
        log "the download does not have SHA-256 $package_sha256: not installing it; check the package URL and digest"
        exit 1
    fi
    mv -f "$1.part" "$1"
}

package_url='https://coord.example.net:7443/packages/nimbus-agent-x86_64-linux'
package_sha256='e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'
config_file='/etc/nimbus/agent.toml'

# The agent configuration, and the join token it enrolls with (0600).
put '/etc/nimbus/agent.toml' 0644 <<'NIMBUS_EOF'
# polynimbus agent configuration, written by nimbus-bootstrap.
# The join token is in /etc/nimbus/join-token (mode 0600); the agent needs it only to enroll the first time.
coordinator = "coord.example.net:7443"
ca_pin = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
token_file = "/etc/nimbus/join-token"
state_dir = "/var/lib/nimbus-agent"
node_name = "edge-1"
NIMBUS_EOF
put '/etc/nimbus/join-token' 0600 <<'NIMBUS_EOF'
nimbus1.abcdefghij.0123456789abcdefghijklmnopqrstuv
NIMBUS_EOF
# Point the service at the configuration, whichever unit the package ships.
put '/etc/systemd/system/nimbus-agent.service.d/10-bootstrap.conf' 0644 <<'NIMBUS_EOF'
# Written by nimbus-bootstrap: run nimbus-agent with the configuration it rendered.
[Service]
Environment=NIMBUS_CONFIG=/etc/nimbus/agent.toml
NIMBUS_EOF

# The agent itself: skipped when this exact package is already installed.
agent_bin='/usr/local/bin/nimbus-agent'
pkg='/var/cache/nimbus-bootstrap/nimbus-agent'
if [ -f "$agent_bin" ] && printf '%s  %s\n' "$package_sha256" "$agent_bin" | sha256sum -c --status -; then
    log "$agent_bin already has SHA-256 $package_sha256"
else
    download "$pkg"
    install -m 0755 "$pkg" "$agent_bin"
    log "installed $agent_bin"
fi
put '/etc/systemd/system/nimbus-agent.service' 0644 <<'NIMBUS_EOF'
# Written by nimbus-bootstrap for an agent installed as a bare binary.
[Unit]
Description=polynimbus agent
Documentation=https://github.com/polynimbus/polynimbus
Wants=network-online.target
After=network-online.target

[Service]
Type=notify
# The launcher starts the current (self-upgraded) version and rolls a failing one back by itself.
ExecStart=/usr/local/bin/nimbus-agent launch
RuntimeDirectory=nimbus-agent
RuntimeDirectoryMode=0700
# The agent reports ready once enrolled; a bare-metal enrollment can wait for `nimbusctl node accept`.
TimeoutStartSec=infinity
Restart=on-failure
RestartSec=5s
# 10 revoked, 64 bad configuration, 77 enrollment refused: a restart cannot fix these.
RestartPreventExitStatus=10 64 77

[Install]
WantedBy=multi-user.target
NIMBUS_EOF

if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable --now --no-block nimbus-agent.service
    log "nimbus-agent is enabled and starting; follow it with: journalctl -u nimbus-agent -f"
else
    log "systemd is not running here: start the agent yourself, e.g. NIMBUS_CONFIG=$config_file nimbus-agent"
fi
