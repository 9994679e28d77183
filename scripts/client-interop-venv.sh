#!/usr/bin/env bash
# The cross-language tests' own Python venv (.venv-client-interop/) from PyPI: pyhpke, an
# independent HPKE implementation that client/tests/interop.rs holds the Rust client against, and
# python-olm (libolm 3, as a wheel) for the Olm sessions of client/tests/olm_interop.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-client-interop
req=client/tests/interop/requirements.txt
if [ ! -x "$venv/bin/python" ] || ! cmp -s "$req" "$venv/.requirements.txt"; then
    echo "==> creating $venv (pyhpke, python-olm)"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
    cp "$req" "$venv/.requirements.txt"
fi
