#!/usr/bin/env bash
# `make smoke API=https://<id>.execute-api.<region>.amazonaws.com`: the README's walk through the
# API, against a deployed stage (or `make dev`: API=http://127.0.0.1:9000), checked against the
# contract (API.md). Every check runs; the exit status is non-zero if any differs.
#
#   API           base URL of the stage (a trailing slash is fine)                  required
#   ORIGIN        a browser origin in CorsAllowedOrigins, for the CORS checks     default http://localhost:3000
#   METRICS_TOKEN the /metrics bearer token; without it /metrics may answer 200 or 401
#
# It registers two users named smoke_a_<run> and smoke_b_<run> (two registrations from this
# address: REGISTER_MAX_PER_ADDRESS allows 20 an hour by default); they stay in the database.
# Needs curl and jq.
set -euo pipefail
cd "$(dirname "$0")/.."

api="${API:-${1:-}}"
[ -n "$api" ] || { echo "usage: make smoke API=https://<api-id>.execute-api.<region>.amazonaws.com" >&2; exit 2; }
api="${api%/}"
origin="${ORIGIN:-http://localhost:3000}"
for tool in curl jq; do
    command -v "$tool" >/dev/null || { echo "smoke: needs $tool" >&2; exit 2; }
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
passed=0
failed=0
status=""
body=""

ok() { passed=$((passed + 1)); }
bad() { failed=$((failed + 1)); echo "FAIL: $*"; }
expect() { # DESCRIPTION TEST-COMMAND...
    local what=$1
    shift
    if "$@"; then ok; else bad "$what"; fi
}
# header NAME: the value of a response header of the last call (case-insensitive), or nothing.
header() {
    awk -v name="$(tr 'A-Z' 'a-z' <<<"$1")" -F': *' '
        { sub(/\r$/, "") }
        tolower($1) == name { sub(/^[^:]*: */, ""); print; exit }' "$work/headers"
}
# call METHOD PATH EXPECTED_STATUS [BODY] [TOKEN] [extra curl args...]: sets $status and $body.
call() {
    local method=$1 path=$2 expected=$3 data=${4:-} token=${5:-}
    shift $(( $# < 5 ? $# : 5 ))
    local args=(-sS --max-time 30 -o "$work/body" -D "$work/headers" -w '%{http_code}' -X "$method" "$api$path")
    [ -n "$data" ] && args+=(-H 'Content-Type: application/json' --data-binary "$data")
    [ -n "$token" ] && args+=(-H "Authorization: Bearer $token")
    status=$(curl "${args[@]}" "$@" || echo "000")
    body=$(cat "$work/body" 2>/dev/null || true)
    if [ "$status" = "$expected" ]; then
        ok
    else
        bad "$method $path: expected $expected, got $status: ${body:0:300}"
    fi
}
# The contract's error body: {"error": CODE, "message": <text>}.
expect_error() { # CODE
    expect "error body {\"error\":\"$1\",\"message\":...}: $body" \
        jq -e --arg c "$1" '.error == $c and (.message | type == "string")' <<<"$body" >/dev/null
}
has_fields() { # JSON FIELD...: every field present
    local json=$1
    shift
    local field
    for field in "$@"; do
        jq -e --arg f "$field" 'has($f)' <<<"$json" >/dev/null || return 1
    done
}
# list_has LIST ITEM...: a comma-separated header value holds every item (case-insensitive).
list_has() {
    local list item
    list=$(tr 'A-Z' 'a-z' <<<"$1" | tr -d ' ')
    shift
    for item in "$@"; do
        item=$(tr 'A-Z' 'a-z' <<<"$item")
        [[ ",$list," == *",$item,"* ]] || return 1
    done
}

run="$(date +%s)$RANDOM"
name_a="smoke_a_$run"
name_b="smoke_b_$run"
key_a=$(jq -Rs . < testdata/keys/ed25519.pem)
key_b=$(jq -Rs . < testdata/keys/p256.pem)
key_c=$(jq -Rs . < testdata/keys/rsa2048.pem)
password_a="smoke-a-password-$run"
password_b="smoke-b-password-$run"

echo "==> smoke test of $api (origin $origin)"

# --- health
call GET /health 200
expect "GET /health body" jq -e '.status == "ok"' <<<"$body" >/dev/null
call GET /health/ready 200
expect "readiness: the database answers (IAM, proxy, TLS, roles): $body" \
    jq -e '.status == "ok" and .database == "ok"' <<<"$body" >/dev/null

# --- accounts
call POST /register 201 "{\"name\":\"$name_a\",\"password\":\"$password_a\",\"public_key\":$key_a}"
expect "register body" has_fields "$body" id name public_key created_at
user_a=$(jq -r '.id // empty' <<<"$body")
call POST /register 201 "{\"name\":\"$name_b\",\"password\":\"$password_b\",\"public_key\":$key_b}"
user_b=$(jq -r '.id // empty' <<<"$body")
call POST /register 409 "{\"name\":\"$(tr 'a-z' 'A-Z' <<<"$name_a")\",\"password\":\"$password_a\",\"public_key\":$key_a}"
expect_error conflict
call POST /register 422 "{\"name\":\"x\",\"password\":\"$password_a\",\"public_key\":$key_a}"
expect_error validation_failed

call POST /login 401 "{\"name\":\"$name_a\",\"password\":\"wrong-password\"}"
expect_error invalid_credentials
expect "401 carries WWW-Authenticate: Bearer" grep -qi '^Bearer' <<<"$(header WWW-Authenticate)"
call POST /login 200 "{\"name\":\"$name_a\",\"password\":\"$password_a\"}"
expect "login body: $body" jq -e '.token_type == "bearer" and (.access_token | type == "string")
    and (.expires_in | type == "number")' <<<"$body" >/dev/null
token_a=$(jq -r '.access_token // empty' <<<"$body")
call POST /login 200 "{\"name\":\"$(tr 'a-z' 'A-Z' <<<"$name_b")\",\"password\":\"$password_b\"}"
token_b=$(jq -r '.access_token // empty' <<<"$body")

call GET /me 401
expect_error unauthorized
expect "401 carries WWW-Authenticate: Bearer" grep -qi '^Bearer' <<<"$(header WWW-Authenticate)"
call GET /me 401 "" "not-a-token"
call GET /me 200 "" "$token_a"
expect "me is the caller" jq -e --arg id "$user_a" '.id == $id' <<<"$body" >/dev/null
expect "me body" has_fields "$body" id name public_key created_at key_updated_at

call GET "/users?name=$name_b" 200 "" "$token_a"
expect "lookup finds b" jq -e --arg id "$user_b" '.user_id == $id' <<<"$body" >/dev/null
call GET "/users?name=nobody_$run" 404 "" "$token_a"
expect_error not_found
call GET "/public-key/$user_b" 200 "" "$token_a"
expect "b's key" jq -e --argjson k "$key_b" '.public_key == $k' <<<"$body" >/dev/null
expect "public key body" has_fields "$body" user_id name public_key key_updated_at
call GET /public-key/not-a-uuid 400 "" "$token_a"
expect_error bad_request
call PUT /update-key 200 "{\"public_key\":$key_c}" "$token_b"
expect "update-key body" has_fields "$body" id name public_key created_at key_updated_at

# --- a message, end to end
ciphertext=$(printf 'not really encrypted %s' "$run" | base64 | tr -d '\n')
call POST /messages 201 "{\"recipient_id\":\"$user_b\",\"encrypted_data\":\"$ciphertext\"}" "$token_a"
expect "send body" has_fields "$body" id sender_id recipient_id timestamp expires_at
message=$(jq -r '.id // empty' <<<"$body")
call GET /messages 200 "" "$token_a"
expect "the sender sees none of the recipient's messages" \
    jq -e --arg m "$message" '[.messages[] | select(.id == $m)] | length == 0' <<<"$body" >/dev/null
call GET "/messages?limit=500" 200 "" "$token_b"
expect "the recipient gets the ciphertext" jq -e --arg m "$message" --arg c "$ciphertext" \
    '(.has_more | type == "boolean") and ([.messages[] | select(.id == $m and .encrypted_data == $c)] | length == 1)' \
    <<<"$body" >/dev/null
call GET "/messages?limit=0" 422 "" "$token_b"
call PUT "/messages/$message/delivered" 404 "" "$token_a"
call PUT "/messages/$message/delivered" 204 "" "$token_b"
call PUT "/messages/$message/delivered" 204 "" "$token_b"
call GET "/messages?limit=500" 200 "" "$token_b"
expect "a confirmed message is gone" \
    jq -e --arg m "$message" '[.messages[] | select(.id == $m)] | length == 0' <<<"$body" >/dev/null

# --- what no route matches
call GET /no-such-path 404
expect_error not_found
call DELETE /messages 405
expect_error method_not_allowed
expect "405 carries Allow with POST and GET: $(header Allow)" list_has "$(header Allow)" POST GET

# --- CORS (API.md "CORS"). In AWS, API Gateway answers the preflight from the stage's CORS
# configuration; locally, the not-found function does. Either way the browser needs a 2xx, the
# origin echoed, the route's methods and the contract's request headers.
preflight() { # PATH METHOD...: a preflight for the first method; all must be allowed
    local path=$1 first=$2
    call OPTIONS "$path" 204 "" "" -H "Origin: $origin" -H "Access-Control-Request-Method: $first" \
        -H 'Access-Control-Request-Headers: authorization,content-type,idempotency-key'
    expect "preflight $path: Access-Control-Allow-Origin is $origin (got '$(header Access-Control-Allow-Origin)'; is it in CorsAllowedOrigins?)" \
        [ "$(header Access-Control-Allow-Origin)" = "$origin" ]
    expect "preflight $path: Access-Control-Allow-Methods has ${*:2} (got '$(header Access-Control-Allow-Methods)')" \
        list_has "$(header Access-Control-Allow-Methods)" "${@:2}"
    expect "preflight $path: Access-Control-Allow-Headers has Authorization, Content-Type, Idempotency-Key (got '$(header Access-Control-Allow-Headers)')" \
        list_has "$(header Access-Control-Allow-Headers)" Authorization Content-Type Idempotency-Key
}
preflight /messages POST GET
preflight "/messages/$message/delivered" PUT
preflight /update-key PUT
preflight /me GET
call OPTIONS /messages 204 "" "" -H 'Origin: https://evil.example' -H 'Access-Control-Request-Method: POST'
expect "a foreign origin gets no Access-Control-Allow-Origin" [ -z "$(header Access-Control-Allow-Origin)" ]
call GET /health 200 "" "" -H "Origin: $origin"
expect "a cross-origin answer carries Access-Control-Allow-Origin: $origin" \
    [ "$(header Access-Control-Allow-Origin)" = "$origin" ]

# --- metrics
if [ -n "${METRICS_TOKEN:-}" ]; then
    call GET /metrics 401
    expect_error unauthorized
    call GET /metrics 200 "" "$METRICS_TOKEN"
    expect "Prometheus text exposition" grep -q '^# TYPE ' "$work/body"
else
    status=$(curl -sS --max-time 30 -o "$work/body" -w '%{http_code}' "$api/metrics" || echo 000)
    case "$status" in
        200 | 401) ok ;;
        *) bad "GET /metrics without a token: expected 200 (no METRICS_TOKEN) or 401, got $status" ;;
    esac
fi

echo "smoke: $passed passed, $failed failed"
[ "$failed" = 0 ]
