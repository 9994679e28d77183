#!/usr/bin/env bash
# CORS in a real browser (API.md "CORS"): headless Chromium loads scripts/browser/cors.html from
# an origin the API allows and scripts/browser/blocked.html from one it does not, each calling a
# running API with fetch. The allowed page registers (a WebCrypto X25519 key), logs in, sends to
# itself twice with one Idempotency-Key, fetches and confirms, provokes a 401 and a 429 and
# deletes the account; the browser must let it read Idempotent-Replayed, WWW-Authenticate and
# Retry-After. The other page's fetches must be refused by the browser (TypeError) although the
# API answers it. Each page writes what it saw as JSON into its DOM (--dump-dom); this script
# judges it.
#   scripts/browser-cors.sh [API_URL]     (default $MESSENGER_API, else http://127.0.0.1:9000)
#   ALLOWED_ORIGIN  an origin in the API's CORS_ALLOWED_ORIGINS, http://localhost:<port> or
#                   http://127.0.0.1:<port>, served here (default http://localhost:3000, the
#                   origin `make dev` allows)
#   BLOCKED_ORIGIN  one that is not (default http://127.0.0.1:<a free port>)
# Chromium comes from scripts/browser/ensure-chromium.sh (Debian's packages, installed when
# missing). When it cannot be had, this prints one line and exits 0: the other tests still run.
# The server must allow one registration from 127.0.0.1 per run (REGISTER_MAX_PER_ADDRESS) and
# counts up to LOGIN_MAX_FAILURES + 1 failed logins against a name of this run's own.
set -euo pipefail
cd "$(dirname "$0")/.."

api="${1:-${MESSENGER_API:-http://127.0.0.1:9000}}"
api="${api%/}"
allowed_origin="${ALLOWED_ORIGIN:-http://localhost:3000}"
allowed_origin="${allowed_origin%/}"
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
blocked_origin="${BLOCKED_ORIGIN:-http://127.0.0.1:$(free_port)}"
blocked_origin="${blocked_origin%/}"

work="$(mktemp -d)"
servers=()
cleanup() {
    for pid in "${servers[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

if ! browser=$(CHROMIUM_INSTALL_LOG="$work/install.log" bash scripts/browser/ensure-chromium.sh 2>"$work/ensure.err"); then
    echo "browser-cors: skipped, no headless Chromium: $(tail -n 1 "$work/ensure.err")"
    exit 0
fi
cat "$work/ensure.err" # what was installed, if anything
curl -sf "$api/health" >/dev/null || { echo "browser-cors: no API at $api (make dev?)"; exit 1; }

# The pages, each served by its own origin's server (one server when both share a port).
mkdir "$work/site"
cp scripts/browser/*.html "$work/site/"
port_of() {
    [[ $1 =~ ^http://(localhost|127\.0\.0\.1):([0-9]+)$ ]] || {
        echo "browser-cors: $1 is not http://localhost:<port> or http://127.0.0.1:<port>" >&2
        return 1
    }
    echo "${BASH_REMATCH[2]}"
}
allowed_port=$(port_of "$allowed_origin")
blocked_port=$(port_of "$blocked_origin")
[ "$allowed_origin" != "$blocked_origin" ] || { echo "browser-cors: the two origins must differ"; exit 1; }
for port in $(printf '%s\n' "$allowed_port" "$blocked_port" | sort -u); do
    python3 -m http.server --bind 127.0.0.1 --directory "$work/site" "$port" >"$work/http-$port.log" 2>&1 &
    servers+=($!)
    for _ in $(seq 1 50); do
        curl -sf "http://127.0.0.1:$port/cors.html" >/dev/null 2>&1 && break
        kill -0 "${servers[-1]}" 2>/dev/null || { echo "browser-cors: cannot serve on port $port:"; tail -n 3 "$work/http-$port.log"; exit 1; }
        sleep 0.1
    done
done

passed=0
failed=0
ok() { passed=$((passed + 1)); echo "ok: $*"; }
fail() { failed=$((failed + 1)); echo "FAIL: $*"; }

# PAGE-URL -> the JSON the page wrote into #result. The page's fetches pause Chromium's virtual
# time, so the budget is spent only between them; the wall-clock timeout is the real bound (the
# first calls to a fresh `cargo lambda watch` start each function with `cargo run`, which may build).
load() {
    local profile
    profile=$(mktemp -d "$work/profile.XXXXXX")
    timeout 240 "$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --user-data-dir="$profile" --virtual-time-budget=60000 --dump-dom "$1" \
        >"$work/dom" 2>>"$work/chromium.log" || true
    python3 -c '
import html, re, sys
found = re.search(r"<pre id=\"result\">(.*?)</pre>", open(sys.argv[1]).read(), re.S)
print(html.unescape(found.group(1)) if found and found.group(1) else "{}")' "$work/dom"
}
# DESCRIPTION JQ-FILTER: passes when the filter is true of $seen; else shows what it was given.
check() {
    if jq -e "$2" <<<"$seen" >/dev/null 2>&1; then
        ok "$1"
    else
        fail "$1"
        echo "  saw: $(jq -c "${3:-.}" <<<"$seen" 2>/dev/null || echo "$seen")"
    fi
}

started=$(date +%s%N)
query="?api=$(jq -rn --arg api "$api" '$api | @uri')"
seen=$(load "$allowed_origin/cors.html$query")
check "the page on $allowed_origin ran to its end" '.done == true and (.page_error == null)' '{done, page_error}'
check "register: 201 through the preflight" '.register.status == 201' .register
check "login: 200, a bearer token" '.login.status == 200 and .login.body == {token_type: "bearer", has_token: true}' .login
check "send: 201, not a replay" '.send.status == 201 and .send.idempotent_replayed == null' .send
check "the same Idempotency-Key again: 201 with Idempotent-Replayed: true, the first answer" \
    '.send_again.status == 201 and .send_again.idempotent_replayed == "true" and .send_again.body == .send.body' \
    '{send, send_again}'
check "GET /me without a token: 401, WWW-Authenticate readable" \
    '.me_without_token.status == 401 and (.me_without_token.www_authenticate // "" | startswith("Bearer"))' \
    .me_without_token
check "GET /messages: the one message, intact" \
    '.messages.status == 200 and ([.messages.body.messages[] | {id, encrypted_data}] == [{id: .send.body.id, encrypted_data: .ciphertext}])' \
    .messages
check "POST /messages/delivered: confirmed 1" '.confirm.status == 200 and .confirm.body == {confirmed: 1, not_found: []}' .confirm
check "GET /messages after confirming: empty" \
    '.messages_after_confirm.status == 200 and .messages_after_confirm.body.messages == []' .messages_after_confirm
check "failed logins end in 429 with Retry-After readable" \
    '.wrong_logins > 1 and .rate_limited.status == 429 and (.rate_limited.retry_after // "" | test("^[0-9]+$"))' \
    '{wrong_logins, rate_limited}'
check "DELETE /me with the password: 204" '.delete.status == 204' .delete
check "the deleted account's token: 401" '.me_after_delete.status == 401' .me_after_delete

seen=$(load "$blocked_origin/blocked.html$query")
check "the page on $blocked_origin ran to its end" '.done == true and (.page_error == null)' '{done, page_error}'
check "another origin: GET /health is refused by the browser (TypeError)" \
    '.get_health.error // "" | startswith("TypeError")' .get_health
check "another origin: a preflighted POST /login is refused by the browser (TypeError)" \
    '.post_login.error // "" | startswith("TypeError")' .post_login
check "another origin: the API does answer it (an opaque no-cors response)" \
    '.no_cors_health.type == "opaque"' .no_cors_health
elapsed_ms=$((($(date +%s%N) - started) / 1000000))

echo "browser-cors: $passed passed, $failed failed ($("$browser" --version 2>/dev/null | head -n 1), ${elapsed_ms} ms)"
if [ "$failed" != 0 ]; then
    # The pages' console: Chromium says there why it refused a request.
    echo "--- the pages' console (last lines) ---"
    grep -F ':CONSOLE' "$work/chromium.log" | tail -n 20 || tail -n 20 "$work/chromium.log"
    exit 1
fi
