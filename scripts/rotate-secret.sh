#!/usr/bin/env bash
# `make rotate-jwt-secret` / `make rotate-metrics-token`: a rotation that reaches the functions.
# CloudFormation re-reads a secret only when the dynamic reference itself changes, so:
#   1. a new random value becomes AWSCURRENT, with a fresh staging label rotated-<UTC time>;
#   2. the app stack is updated (previous template, every other parameter unchanged) with
#      JwtSecretStage / MetricsTokenSecretStage set to that label: every function holding the
#      reference gets the new value. For the JWT secret in three steps (below), so no live
#      token is refused: JwtPreviousSecretStage (JWT_PREVIOUS_SECRET) carries the other secret
#      while the functions are updated one by one;
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

# The JWT secret's new version gets AWSCURRENT only at the end: until then AWSCURRENT (the
# label of the first deploy) must keep naming the old value, which the functions still use.
if [ "$1" = jwt ]; then stages='[$stage]'; else stages='["AWSCURRENT", $stage]'; fi
echo "==> new value for $arn_param under $new_stage"
aws secretsmanager get-random-password --password-length "$length" --exclude-punctuation \
    --query RandomPassword --output text \
    | jq -R --arg id "$arn" --arg stage "$new_stage" \
        "{SecretId: \$id, SecretString: ., VersionStages: $stages}" > "$work/put.json"
version=$(aws secretsmanager put-secret-value --cli-input-json "file://$work/put.json" \
    --query VersionId --output text)
rm -f "$work/put.json"
echo "    version $version"

# update_stack NAME=VALUE...: the app stack with these parameters, every other unchanged.
update_stack() {
    local overrides
    overrides=$(printf '%s\n' "$@" | jq -R 'split("=") | {(.[0]): (.[1:] | join("="))}' | jq -s add)
    jq --argjson set "$overrides" \
        '[.[] | if $set[.ParameterKey] then {ParameterKey, ParameterValue: $set[.ParameterKey]}
               else {ParameterKey: .ParameterKey, UsePreviousValue: true} end]' \
        "$work/params.json" > "$work/update.json"
    echo "==> updating $app_stack: $*"
    aws cloudformation update-stack --stack-name "$app_stack" --use-previous-template \
        --parameters "file://$work/update.json" --capabilities CAPABILITY_IAM CAPABILITY_AUTO_EXPAND >/dev/null
    if ! aws cloudformation wait stack-update-complete --stack-name "$app_stack"; then
        echo "the update failed ($(stack_status "$app_stack")): CloudFormation rolled back to the previous step; run it again" >&2
        exit 1
    fi
}

if [ "$1" = jwt ]; then
    # Three rolling updates, so that no instance ever refuses a live token, however the update
    # orders them (README "Rotating the JWT secret"):
    #   1. every instance also accepts the new secret (JWT_PREVIOUS_SECRET), still signing with
    #      the old one;
    #   2. every instance signs with the new secret, still accepting the old one;
    #   3. once every token of the old secret has expired (JwtTtlSeconds), the old one goes.
    ttl=$(param JwtTtlSeconds)
    update_stack "JwtPreviousSecretStage=$new_stage"
    update_stack "$stage_param=$new_stage" "JwtPreviousSecretStage=$old_stage"
    wait_s=$(( ${ttl:-900} + 10 ))
    echo "==> waiting ${wait_s} s, until every token signed with the old secret has expired"
    sleep "$wait_s"
    update_stack "JwtPreviousSecretStage=none"
    current=$(aws secretsmanager describe-secret --secret-id "$arn" --output json \
        | jq -r '.VersionIdsToStages | to_entries[] | select(.value | index("AWSCURRENT")) | .key')
    aws secretsmanager update-secret-version-stage --secret-id "$arn" --version-stage AWSCURRENT \
        --move-to-version-id "$version" --remove-from-version-id "$current" >/dev/null
else
    update_stack "$stage_param=$new_stage"
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
