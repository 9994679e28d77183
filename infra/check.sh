#!/usr/bin/env bash
# Offline checks of the deployment files (no AWS account, no cargo): cfn-lint on both templates,
# SAM's own validation, and the consistency/security tests in infra/tests. Runs every step and
# exits non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."

bash scripts/ensure-venv.sh || exit 1

export AWS_DEFAULT_REGION=us-east-1 SAM_CLI_TELEMETRY=0
failed=()
step() {
    echo "==> $*"
    "$@" || failed+=("$*")
}

step .venv/bin/cfn-lint template.yaml infra/network-database.yaml
# --lint runs cfn-lint with the SAM transform locally; it makes no AWS call.
step .venv/bin/sam validate --lint --template template.yaml --region us-east-1
step .venv/bin/python -m unittest discover -s infra/tests -v

if ((${#failed[@]})); then
    printf 'FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "==> all deployment checks passed"
