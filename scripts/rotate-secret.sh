#!/usr/bin/env bash
# `make rotate-jwt-secret` / `make rotate-metrics-token`: a rotation that reaches the functions.
# CloudFormation re-reads a secret only when the dynamic reference itself changes, so:
#   1. a new random value becomes AWSCURRENT, with a fresh staging label rotated-<UTC time>;
#   2. the app stack is updated (previous template, every other parameter unchanged) with
#      JwtSecretStage / MetricsTokenSecretStage set to that label: every function holding the
#      reference gets the new value;
#   3. after success, the previous rotated-* label is removed (the old version then ages out).
# If the update fails, CloudFormation rolls back to the previous label: the functions keep the
# old value, which stays readable under that label; run it again.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/aws-common.sh

case "${1:-}" in
    jwt) arn_param=JwtSecretArn stage_param=JwtSecretStage length=64 ;;
    metrics) arn_param=MetricsTokenSecretArn stage_param=MetricsTokenSecretStage length=48 ;;
    *) echo "usage: $0 jwt|metrics" >&2; exit 2 ;;
esac

umask 077
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

aws cloudformation describe-stacks --stack-name "$app_stack" --query 'Stacks[0].Parameters' \
    --output json > "$work/params.json"
param() { jq -r --arg k "$1" '.[] | select(.ParameterKey == $k) | .ParameterValue' "$work/params.json"; }
arn=$(param "$arn_param")
old_stage=$(param "$stage_param")
[ -n "$arn" ] || { echo "$app_stack has no parameter $arn_param" >&2; exit 1; }
new_stage="rotated-$(date -u +%Y%m%dT%H%M%SZ)"

echo "==> new value for $arn_param under $new_stage (and AWSCURRENT)"
aws secretsmanager get-random-password --password-length "$length" --exclude-punctuation \
    --query RandomPassword --output text \
    | jq -R --arg id "$arn" --arg stage "$new_stage" \
        '{SecretId: $id, SecretString: ., VersionStages: ["AWSCURRENT", $stage]}' > "$work/put.json"
version=$(aws secretsmanager put-secret-value --cli-input-json "file://$work/put.json" \
    --query VersionId --output text)
rm -f "$work/put.json"
echo "    version $version"

echo "==> updating $app_stack: $stage_param $old_stage -> $new_stage"
jq --arg k "$stage_param" --arg v "$new_stage" \
    '[.[] | if .ParameterKey == $k then {ParameterKey: $k, ParameterValue: $v}
           else {ParameterKey: .ParameterKey, UsePreviousValue: true} end]' \
    "$work/params.json" > "$work/update.json"
aws cloudformation update-stack --stack-name "$app_stack" --use-previous-template \
    --parameters "file://$work/update.json" --capabilities CAPABILITY_IAM CAPABILITY_AUTO_EXPAND >/dev/null
if ! aws cloudformation wait stack-update-complete --stack-name "$app_stack"; then
    echo "the update failed ($(stack_status "$app_stack")): the functions keep the value under $old_stage" >&2
    exit 1
fi

if [[ "$old_stage" == rotated-* ]]; then
    old_version=$(aws secretsmanager describe-secret --secret-id "$arn" --output json \
        | jq -r --arg s "$old_stage" '.VersionIdsToStages | to_entries[] | select(.value | index($s)) | .key')
    if [ -n "$old_version" ]; then
        aws secretsmanager update-secret-version-stage --secret-id "$arn" --version-stage "$old_stage" \
            --remove-from-version-id "$old_version" >/dev/null
        echo "==> removed the old label $old_stage"
    fi
fi
echo "==> $stage_param is $new_stage: the functions hold the new value"
