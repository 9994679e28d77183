# Sourced by the operator scripts (deploy-infra, setup-roles, rotate-secret): stack names, the
# region and a stack-output reader. Needs the AWS CLI v2 with credentials, and jq.
infra_stack="${INFRA_STACK:-secure-messenger-infra}"
app_stack="${STACK:-secure-messenger}"
region="${AWS_REGION:-${AWS_DEFAULT_REGION:-$(aws configure get region 2>/dev/null || true)}}"
[ -n "$region" ] || { echo "set AWS_REGION (or a default region in the AWS CLI)" >&2; exit 2; }
export AWS_REGION="$region" AWS_DEFAULT_REGION="$region"
for tool in aws jq; do
    command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 2; }
done

# stack_output STACK KEY: one output value, or an error.
stack_output() {
    local value
    value=$(aws cloudformation describe-stacks --stack-name "$1" \
        --query "Stacks[0].Outputs[?OutputKey=='$2'].OutputValue" --output text)
    [ -n "$value" ] && [ "$value" != None ] || { echo "stack $1 has no output $2" >&2; return 1; }
    printf '%s\n' "$value"
}

# stack_status STACK: its status, or NONE when it does not exist.
stack_status() {
    aws cloudformation describe-stacks --stack-name "$1" --query 'Stacks[0].StackStatus' \
        --output text 2>/dev/null || echo NONE
}
