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

package_url='https://coord.example.net:7443/packages/nimbus-agent_0.1.0_amd64.deb'
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
release_root = "/etc/nimbus/release-root.json"
NIMBUS_EOF
put '/etc/nimbus/join-token' 0600 <<'NIMBUS_EOF'
nimbus1.abcdefghij.0123456789abcdefghijklmnopqrstuv
NIMBUS_EOF
# The release root the agent verifies upgrades against (public metadata).
put '/etc/nimbus/release-root.json' 0644 <<'NIMBUS_EOF'
{
  "signed": {
    "_type": "root",
    "spec_version": "1.0.0",
    "consistent_snapshot": true,
    "version": 1,
    "expires": "2027-11-25T17:11:40Z",
    "keys": {
      "d51061f76e642173444cbd77039170bd85c1df545257e17a3c4886049d4eee24": {
        "keytype": "ed25519",
        "keyval": {
          "public": "9302ae66929892f4ceb855e1ccddea9ecdc8b85671ca1a7c71267cb83216b4e7"
        },
        "scheme": "ed25519"
      },
      "8c3e4011f5ad408669d5834d685bb009fb69bd397b0bc95984cd3e1f1b3a6dcd": {
        "keytype": "ed25519",
        "keyval": {
          "public": "81237c24be9c8a282faaab6bf64d7e39853d917fd2830969785140848bf7b601"
        },
        "scheme": "ed25519"
      },
      "2d523c215fa2644b2ee611c89da6ca002dd33cab31bc7d0b06801857ec664ac1": {
        "keytype": "ed25519",
        "keyval": {
          "public": "396753c4f35c6dcb4a1232852f215685d2b006954225c773a0c79e6d0458ae87"
        },
        "scheme": "ed25519"
      },
      "267aec86d36df6344f754994cd546e7794430c1faf056340e49bd6aad9a2586e": {
        "keytype": "ed25519",
        "keyval": {
          "public": "def36f2feeab0d4bedbb4fa1ad69e69509a863ebac4073df13d066af5af08129"
        },
        "scheme": "ed25519"
      }
    },
    "roles": {
      "root": {
        "keyids": [
          "d51061f76e642173444cbd77039170bd85c1df545257e17a3c4886049d4eee24"
        ],
        "threshold": 1
      },
      "timestamp": {
        "keyids": [
          "2d523c215fa2644b2ee611c89da6ca002dd33cab31bc7d0b06801857ec664ac1"
        ],
        "threshold": 1
      },
      "snapshot": {
        "keyids": [
          "267aec86d36df6344f754994cd546e7794430c1faf056340e49bd6aad9a2586e"
        ],
        "threshold": 1
      },
      "targets": {
        "keyids": [
          "8c3e4011f5ad408669d5834d685bb009fb69bd397b0bc95984cd3e1f1b3a6dcd"
        ],
        "threshold": 1
      }
    }
  },
  "signatures": [
    {
      "keyid": "d51061f76e642173444cbd77039170bd85c1df545257e17a3c4886049d4eee24",
      "sig": "4ff6fe649b48c1ce7c5bd0f82b2ed783647161a3f37aba628f8dcc19b227a67dca669e7b57c7ef3f7da9c94135be59959186636906e5e03906703684fdbb3706"
    }
  ]
}
NIMBUS_EOF
# Point the service at the configuration, whichever unit the package ships.
put '/etc/systemd/system/nimbus-agent.service.d/10-bootstrap.conf' 0644 <<'NIMBUS_EOF'
# Written by nimbus-bootstrap: run nimbus-agent with the configuration it rendered.
[Service]
Environment=NIMBUS_CONFIG=/etc/nimbus/agent.toml
NIMBUS_EOF

# The agent itself: skipped when this exact package is already installed.
marker='/var/lib/nimbus-bootstrap/package.sha256'
pkg='/var/cache/nimbus-bootstrap/nimbus-agent.deb'
if [ -f "$marker" ] && [ "$(cat "$marker")" = "$package_sha256" ] && dpkg -s nimbus-agent 2>/dev/null | grep -qx 'Status: install ok installed'; then
    log "the nimbus-agent package $package_sha256 is already installed"
else
    download "$pkg"
    dpkg -i "$pkg"
    mkdir -p "$(dirname "$marker")"
    printf '%s\n' "$package_sha256" > "$marker"
fi

if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable --now --no-block nimbus-agent.service
    log "nimbus-agent is enabled and starting; follow it with: journalctl -u nimbus-agent -f"
else
    log "systemd is not running here: start the agent yourself, e.g. NIMBUS_CONFIG=$config_file nimbus-agent"
fi
