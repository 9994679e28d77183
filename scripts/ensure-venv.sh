#!/usr/bin/env bash
# Creates .venv with the Python-packaged tools (cargo-lambda, cfn-lint, sam) once; re-runs only
# when requirements-dev.txt changes. Prints nothing on the fast path.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.requirements-dev.txt
if [ -x .venv/bin/python ] && cmp -s requirements-dev.txt "$stamp"; then exit 0; fi
echo "==> installing Python tools into .venv (cargo-lambda, cfn-lint, aws-sam-cli)" >&2
python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check --upgrade pip >&2
.venv/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt >&2
cp requirements-dev.txt "$stamp"
