#!/usr/bin/env bash
# `make setup-roles`: creates the two database roles once (infra/README.md step 3), from your
# workstation, with nothing inside the VPC but the app stack's setup-roles function:
#   1. reads the master user's password from Secrets Manager (public endpoint, from here);
#   2. downloads the RDS CA bundle of the region (for verify-full TLS to the instance);
#   3. invokes setup-roles with both in the payload: it connects to the instance as the master
#      user and runs infra/create-db-user.sql (idempotent), then checks both roles.
# The password goes to a 0600 file in a temporary directory (never the command line) and is
# removed on exit; the function never logs its payload.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/aws-common.sh

host=$(stack_output "$infra_stack" DbInstanceEndpoint)
port=$(stack_output "$infra_stack" DbPort)
database=$(stack_output "$infra_stack" DbName)
user=$(stack_output "$infra_stack" DbMasterUsername)
secret=$(stack_output "$infra_stack" DbMasterUserSecretArn)
function=$(stack_output "$app_stack" SetupRolesFunctionName)

umask 077
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "==> RDS CA bundle for $region"
curl -fsS "https://truststore.pki.rds.amazonaws.com/$region/$region-bundle.pem" -o "$work/ca.pem"
echo "==> master password of $user (Secrets Manager)"
aws secretsmanager get-secret-value --secret-id "$secret" --query SecretString --output text \
    | jq -j .password > "$work/password"
jq -n --arg host "$host" --argjson port "$port" --arg database "$database" --arg user "$user" \
    --rawfile password "$work/password" --rawfile ca_pem "$work/ca.pem" \
    '{host: $host, port: $port, database: $database, user: $user, password: $password, ca_pem: $ca_pem}' \
    > "$work/payload.json"
rm -f "$work/password"

echo "==> invoking $function (runs infra/create-db-user.sql on $host/$database)"
error=$(aws lambda invoke --function-name "$function" --payload "fileb://$work/payload.json" \
    --query FunctionError --output text "$work/result.json")
cat "$work/result.json"
echo
if [ -n "$error" ] && [ "$error" != None ]; then
    echo "setup-roles failed ($error); its log group is /aws/lambda/$function" >&2
    exit 1
fi
echo "==> roles ready; next: apply the migrations (infra/README.md step 4)"
