#!/usr/bin/env bash
# `make deploy-infra`: the network and database stack (infra/README.md step 1), safe to retry.
# The first create runs with DbDeletionProtection=false, so a failure rolls back cleanly (a
# protected instance cannot be deleted and the stack would end in ROLLBACK_FAILED); once the
# stack exists, every run (this one included) passes DbDeletionProtection=true.
# INFRA_PARAMS: more parameter overrides, e.g. INFRA_PARAMS="DbMultiAz=true DbInstanceClass=db.t4g.small".
# ALARM_TOPIC_ARN: the SNS topic the alarms notify (AlarmTopicArn); needed for the first create,
# later runs keep the stack's value unless it is given again.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/aws-common.sh
read -r -a extra <<<"${INFRA_PARAMS:-}"
# The environment key serves the app stack's functions only (their names start with its name).
extra+=("AppStackName=$app_stack")
[ -z "${ALARM_TOPIC_ARN:-}" ] || extra+=("AlarmTopicArn=$ALARM_TOPIC_ARN")

deploy() { # DELETION_PROTECTION
    aws cloudformation deploy --stack-name "$infra_stack" --template-file infra/network-database.yaml \
        --capabilities CAPABILITY_IAM --no-fail-on-empty-changeset \
        --parameter-overrides "DbDeletionProtection=$1" "${extra[@]}"
}

status=$(stack_status "$infra_stack")
case "$status" in
    ROLLBACK_COMPLETE)
        # A failed first create leaves a stack that can only be deleted (nothing in it is kept).
        echo "==> $infra_stack is ROLLBACK_COMPLETE (a failed first create): deleting it, then retrying"
        aws cloudformation delete-stack --stack-name "$infra_stack"
        aws cloudformation wait stack-delete-complete --stack-name "$infra_stack"
        status=NONE
        ;;
    ROLLBACK_FAILED | DELETE_FAILED | *_IN_PROGRESS)
        echo "$infra_stack is $status: look at its events before retrying" >&2
        exit 1
        ;;
esac
if [ "$status" = NONE ] && [ -z "${ALARM_TOPIC_ARN:-}" ] && [[ " ${INFRA_PARAMS:-} " != *" AlarmTopicArn="* ]]; then
    echo "set ALARM_TOPIC_ARN to the SNS topic the alarms notify (infra/README.md step 1)" >&2
    exit 2
fi
if [ "$status" = NONE ]; then
    echo "==> creating $infra_stack (deletion protection off until the create succeeds, ~20 min)"
    deploy false
fi
echo "==> $infra_stack: deletion protection on"
deploy true
aws cloudformation describe-stacks --stack-name "$infra_stack" --query 'Stacks[0].Outputs' --output table
