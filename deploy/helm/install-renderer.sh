#!/usr/bin/env bash
# Install the renderer that deploy/helm/render.py (and tests/tests/helm.rs) need: a Python venv with the PyPI
# package helm-python-sdk, which bundles Helm v4's Go SDK as a native library (no helm binary, no cluster).
# Idempotent: a venv that already has the pinned version is left alone. Prints the venv's python on stdout
# (everything else goes to stderr), e.g.  NIMBUS_HELM_PYTHON="$(deploy/helm/install-renderer.sh)"
#
#   NIMBUS_HELM_VENV   where the venv goes [default: /opt/nimbus-helm]
#
# Needs python3 with its venv module (on Debian/Ubuntu the python3-venv package: installed here with apt-get
# when missing, as root) and access to PyPI.
set -euo pipefail

VENV="${NIMBUS_HELM_VENV:-/opt/nimbus-helm}"
VERSION="0.2.2"
PY="$VENV/bin/python"

say() { echo "install-renderer.sh: $*" >&2; }

# The pinned version is installed and its native library loads.
installed() {
    [[ -x "$PY" ]] && "$PY" - "$VERSION" >/dev/null 2>&1 <<'EOF'
import importlib.metadata, sys
import helm_python
sys.exit(importlib.metadata.version("helm-python-sdk") != sys.argv[1] or helm_python.helm_sdk_version() == "")
EOF
}

if installed; then
    echo "$PY"
    exit 0
fi

# Debian and Ubuntu ship venv's pip bootstrap (ensurepip) in python3-venv (which pulls in python3); without it
# `python3 -m venv` fails.
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    if ! command -v apt-get >/dev/null 2>&1; then
        say "python3 with its venv module is missing and there is no apt-get: install python3 and its venv package"
        exit 1
    fi
    if [[ "$(id -u)" -ne 0 ]]; then
        say "python3 with its venv module is missing: run as root to install python3-venv, or install it yourself"
        exit 1
    fi
    say "installing python3-venv"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends python3-venv >&2
fi

# --clear: a venv left half-made by an interrupted run (or with another version) starts over.
say "creating the venv $VENV with helm-python-sdk==$VERSION"
python3 -m venv --clear "$VENV" >&2
"$PY" -m pip install --quiet --disable-pip-version-check --no-input "helm-python-sdk==$VERSION" >&2

if ! installed; then
    say "helm-python-sdk==$VERSION is installed in $VENV but does not load; see why with: $PY -c 'import helm_python'"
    exit 1
fi
echo "$PY"
