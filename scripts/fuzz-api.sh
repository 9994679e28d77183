#!/usr/bin/env bash
# Property-based fuzzing of the real binaries against openapi.yaml (`make fuzz-api`).
#
# Starts the API as scripts/e2e.sh does (`cargo lambda watch` with the Cargo.toml router on a free
# local port, database `messenger_fuzz`), with rate limits raised so fuzzing is not throttled,
# registers a user and logs in, then runs schemathesis on every operation of openapi.yaml with that
# user's bearer token: every response must be documented (status, content type, headers, body
# schema), schema-violating requests must be refused with a 4xx, undocumented methods must get 405
# with Allow, an operation with security must refuse a request without it, and nothing may answer
# 5xx. Then scripts/fuzz_fallback.py probes the 404/405 answers openapi.yaml states only in prose.
# Exits non-zero on any failure.
#
# Environment:
#   FUZZ_EXAMPLES  test cases per operation (default 100)
#   FUZZ_PHASES    schemathesis phases (default examples,coverage,fuzzing,stateful)
#   FUZZ_SEED      replay a run with its seed (default: random; printed)
#   FUZZ_WORKERS   schemathesis workers (default 1: with 2 or more, Python 3.11's ast.parse can
#                  fail in hypothesis with "AST constructor recursion depth mismatch", a race in
#                  CPython, not in the API)
#   FUZZ_PORT      port of the local API (default: a free one)
#   FUZZ_REPORT    directory for the reports and the watch log (default: a temporary one, copied
#                  to .local/fuzz-report-<time> when the run fails)
set -euo pipefail
cd "$(dirname "$0")/.."

examples="${FUZZ_EXAMPLES:-100}"
phases="${FUZZ_PHASES:-examples,coverage,fuzzing,stateful}"
seed="${FUZZ_SEED:-$((RANDOM * 32768 + RANDOM))}"
workers="${FUZZ_WORKERS:-1}"
# positive_data_acceptance is left out: a schema-valid request may still be refused by a rule no
# JSON Schema can state (a PEM that does not parse as a key, a password over 72 bytes of UTF-8),
# and those answers are held to the contract by status_code_conformance.
checks="not_a_server_error,status_code_conformance,content_type_conformance"
checks+=",response_schema_conformance,response_headers_conformance,negative_data_rejection"
checks+=",missing_required_header,unsupported_method,allow_header_conformance,ignored_auth"
checks+=",use_after_free,ensure_resource_availability"

bash scripts/ensure-venv.sh
command -v jq >/dev/null || { echo "fuzz-api: needs jq" >&2; exit 1; }

export DATABASE_URL="$(bash scripts/database-url.sh messenger_fuzz)"
free_port() {
    .venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
port="${FUZZ_PORT:-$(free_port)}"
base="http://127.0.0.1:$port"
work="$(mktemp -d)"
report="${FUZZ_REPORT:-$work/report}"
mkdir -p "$report"
log="$report/watch.log"
run_started=$(date +%s)

echo "==> building every function"
cargo build -p functions --bins --quiet
./target/debug/migrate >/dev/null
# METRICS_TOKEN unset: /metrics is then open, so its 200 exposition is fuzzed too (its 401 is
# covered by the e2e and integration tests). A token lifetime longer than any run.
env -u METRICS_TOKEN \
    JWT_SECRET="fuzz-$(head -c 32 /dev/urandom | base64 | tr -d '\n/+=')" \
    JWT_TTL_SECONDS=3600 BCRYPT_COST=4 RUST_LOG="${RUST_LOG:-warn}" \
    LOGIN_MAX_FAILURES=1000000 LOGIN_MAX_FAILURES_PER_ADDRESS=1000000 \
    LOGIN_MAX_FAILURES_PER_NAME=1000000 REGISTER_MAX_PER_ADDRESS=1000000 \
    SEND_MAX_PER_WINDOW=1000000 \
    bash scripts/lambda-env.sh "$work/env"

.venv/bin/cargo-lambda lambda watch --invoke-address 127.0.0.1 --invoke-port "$port" \
    --disable-cors --ignore-changes --concurrency 2 --env-file "$work/env" >"$log" 2>&1 &
watch_pid=$!
status=1
cleanup() {
    kill "$watch_pid" 2>/dev/null || true
    wait "$watch_pid" 2>/dev/null || true
    if [ "$status" != 0 ] && [ -z "${FUZZ_REPORT:-}" ]; then
        keep=".local/fuzz-report-$(date +%Y%m%d-%H%M%S)"
        mkdir -p .local && cp -r "$report" "$keep" && echo "fuzz-api: reports and log kept in $keep"
    fi
    rm -rf "$work"
}
trap cleanup EXIT

for _ in $(seq 1 120); do
    curl -sf "$base/health" >/dev/null 2>&1 && break
    kill -0 "$watch_pid" 2>/dev/null || { cat "$log"; echo "cargo lambda watch exited"; exit 1; }
    sleep 0.5
done

# The fuzzing user: a fresh account per run, so its mailbox starts empty.
name="fuzz$RANDOM$RANDOM"
password="fuzz-password-$RANDOM"
key=$(jq -Rs . < testdata/keys/ed25519.pem)
curl -sf "$base/register" -H 'content-type: application/json' \
    -d "{\"name\":\"$name\",\"password\":\"$password\",\"public_key\":$key}" >/dev/null \
    || { echo "fuzz-api: could not register the fuzzing user"; tail -20 "$log"; exit 1; }
token=$(curl -sf "$base/login" -H 'content-type: application/json' \
    -d "{\"name\":\"$name\",\"password\":\"$password\"}" | jq -r .access_token)
[ -n "$token" ] && [ "$token" != null ] || { echo "fuzz-api: login failed"; exit 1; }
# Start every function once, so no fuzzed request pays for an instance start.
for path in /me /messages "/users?name=nobody" "/public-key/$(cat /proc/sys/kernel/random/uuid)" \
    /metrics /health/ready /nowhere; do
    curl -s -o /dev/null "$base$path" -H "authorization: Bearer $token" || true
done
curl -s -o /dev/null -X PUT "$base/update-key" -H "authorization: Bearer $token" || true
curl -s -o /dev/null -X POST "$base/messages" -H "authorization: Bearer $token" || true
curl -s -o /dev/null -X PUT "$base/messages/x/delivered" -H "authorization: Bearer $token" || true
curl -s -o /dev/null -X POST "$base/messages/delivered" -H "authorization: Bearer $token" || true
curl -s -o /dev/null -X DELETE "$base/me" -H "authorization: Bearer $token" || true

echo "==> schemathesis: $examples examples per operation, phases $phases, seed $seed, $base"
fuzz_started=$(date +%s)
set +e
.venv/bin/schemathesis --no-color --config-file scripts/schemathesis.toml run openapi.yaml \
    --url "$base" \
    --header "Authorization: Bearer $token" \
    --checks "$checks" \
    --phases "$phases" \
    --max-examples "$examples" \
    --workers "$workers" \
    --seed "$seed" \
    --generation-database none \
    --request-timeout 10 --request-retries 2 \
    --suppress-health-check too_slow \
    --report junit --report-junit-path "$report/junit.xml" 2>&1 | tee "$report/schemathesis.txt"
fuzz_rc=${PIPESTATUS[0]}
fuzz_elapsed=$(($(date +%s) - fuzz_started))

echo "==> probing 404/405 answers"
.venv/bin/python scripts/fuzz_fallback.py openapi.yaml "$base" "$token" | tee "$report/fallback.txt"
probe_rc=${PIPESTATUS[0]}
set -e

operations=$(grep -oE 'Tested: [0-9]+' "$report/schemathesis.txt" | grep -oE '[0-9]+' || echo "?")
cases=$(grep -oE '[0-9]+ generated' "$report/schemathesis.txt" | grep -oE '[0-9]+' || echo "?")
failed_ops=$(.venv/bin/python - "$report/junit.xml" <<'EOF' 2>/dev/null || echo "?"
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
cases = [c for s in suites for c in s.findall("testcase")]
print(sum(1 for c in cases if c.find("failure") is not None or c.find("error") is not None))
EOF
)
echo "==> fuzz-api: $operations operations, $cases test cases, $failed_ops operations with failures" \
    "(schemathesis exit $fuzz_rc, ${fuzz_elapsed}s); $(tail -1 "$report/fallback.txt");" \
    "whole run $(($(date +%s) - run_started))s; seed $seed"
if [ "$fuzz_rc" != 0 ] || [ "$probe_rc" != 0 ]; then
    exit 1
fi
status=0
