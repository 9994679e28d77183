#!/usr/bin/env bash
# End to end through the `messenger` CLI against a running API (`make dev`):
#   scripts/client-e2e.sh [API_URL]          (default $MESSENGER_API, else http://127.0.0.1:9000)
# Two profiles in a temporary MESSENGER_HOME exchange 100 messages through the CLI (each arrives
# once and intact); a contact's key change is refused until `trust`; `rotate-key` loses nothing
# in flight; each user links a second device (link, join, trust) and 40 messages reach all four
# devices once each, a device is removed; an expired or revoked token is renewed by logging in
# again; accounts are deleted.
# Optional:
#   DATABASE_URL  the API's database: every column of every table is dumped while messages are
#                 pending, and no plaintext may appear in it (as text or as hex); and a
#                 replayed, a tampered and a re-addressed envelope are posted through the API
#                 and must each be refused by the recipient's client, never shown.
#   LOG_FILE      the functions' log: no plaintext, password or token may appear in it.
#   MESSENGER     the binary to use (default: cargo build -p client, target/debug/messenger).
# The server must allow 4 registrations from 127.0.0.1 per run (REGISTER_MAX_PER_ADDRESS, 20 an
# hour by default).
set -euo pipefail
cd "$(dirname "$0")/.."

api="${1:-${MESSENGER_API:-http://127.0.0.1:9000}}"
api="${api%/}"
if [ -z "${MESSENGER:-}" ]; then
    cargo build -p client --quiet
    MESSENGER="$PWD/target/debug/messenger"
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export MESSENGER_HOME="$work/home" MESSENGER_API="$api"
unset MESSENGER_PASSWORD MESSENGER_PROFILE
curl -sf "$api/health" >/dev/null || { echo "client-e2e: no API at $api (make dev?)"; exit 1; }

passed=0
failed=0
ok() { passed=$((passed + 1)); echo "ok: $*"; }
fail() { failed=$((failed + 1)); echo "FAIL: $*"; }
check() { # description, then a command that must succeed (its stdout is not shown)
    local what=$1
    shift
    if "$@" >/dev/null; then ok "$what"; else fail "$what"; fi
}
# status CMD... -> its exit status; stdout in $work/out, stderr in $work/err
status() { set +e; "$@" >"$work/out" 2>"$work/err"; echo $?; set -e; }

run="$(head -c 5 /dev/urandom | od -An -tx1 | tr -d ' \n')"
alice="alice_$run" bob="bob_$run" carol="carol_$run"
rand() { head -c 12 /dev/urandom | base64 | tr -d '/+='; }
pa="pw-a-$(rand)" pb="pw-b-$(rand)" pc="pw-c-$(rand)"
A() { MESSENGER_PASSWORD="$pa" "$MESSENGER" --profile a "$@"; }
B() { MESSENGER_PASSWORD="$pb" "$MESSENGER" --profile b "$@"; }
C() { MESSENGER_PASSWORD="$pc" "$MESSENGER" --profile c "$@"; }
A2() { MESSENGER_PASSWORD="$pa" "$MESSENGER" --profile a2 "$@"; } # alice's second device
B2() { MESSENGER_PASSWORD="$pb" "$MESSENGER" --profile b2 "$@"; } # bob's second device

: >"$work/markers"          # one unique marker per plaintext, to search the database and logs
: >"$work/sent"             # every text sent, JSON-encoded, one per line
for w in A B C A2 B2; do : >"$work/expected-$w"; : >"$work/shown-$w"; : >"$work/dropped-$w"; : >"$work/held-$w"; done
new_text() { # N -> a unique text in $text (some with non-ASCII, quotes, a newline)
    local m="e2e-$run-$1-$(rand)"
    echo "$m" >>"$work/markers"
    case $(($1 % 10)) in
        3) text="$m ünïcödé 🔐 \"quotes\" \\ backslash" ;;
        7) text="$m"$'\n'"second line" ;;
        *) text="$m" ;;
    esac
}
inbox() { # A|B|C [args] -> shown texts (JSON strings), refusals appended per profile
    local who=$1
    shift
    "$who" --json inbox --limit 7 "$@" >"$work/inbox.json"
    jq -c '.messages[].text' "$work/inbox.json" >>"$work/shown-$who"
    jq -c '.dropped[]' "$work/inbox.json" >>"$work/dropped-$who"
    jq -c '.held[]' "$work/inbox.json" >>"$work/held-$who"
}
dump_db() { # every column of every table of the public schema, as COPY text
    : >"$work/dump"
    for t in $(psql "$DATABASE_URL" -tAc "SELECT quote_ident(tablename) FROM pg_tables WHERE schemaname = 'public'"); do
        psql "$DATABASE_URL" -qc "COPY (SELECT * FROM $t) TO STDOUT" >>"$work/dump"
    done
}
leaks_in() { # FILE -> how many markers appear in it, as text or as hex (bytea)
    local n=0 m hexm
    while IFS= read -r m; do
        hexm=$(printf '%s' "$m" | od -An -tx1 | tr -d ' \n')
        if grep -qF -- "$m" "$1" || grep -qiF -- "$hexm" "$1"; then n=$((n + 1)); fi
    done <"$work/markers"
    echo "$n"
}

echo "== register, whoami"
check "register alice" A --json register "$alice"
check "register bob" B --json register "$bob"
fp=$(A --json whoami | jq -r .fingerprint)
check "fingerprint is 64 lowercase hex" grep -qE '^[0-9a-f]{64}$' <<<"$fp"
check "whoami shows it in groups of 4" grep -qF "$(sed -E 's/(.{4})/\1 /g; s/ $//' <<<"$fp")" <(A whoami)
check "the key file is mode 0600" test "$(stat -c %a "$MESSENGER_HOME/a/keys.json")" = 600
check "a second account in one profile is refused (2)" test "$(status A register "x$alice")" = 2
check "a taken name is refused (8)" test "$(status C register "$bob")" = 8
check "an unknown recipient is refused (4)" test "$(status A send "nobody_$run" hi)" = 4

echo "== 100 messages, both ways, inboxes read as they go (version 2: Olm sessions from claimed prekeys)"
sends=0
for i in $(seq 1 100); do
    new_text "$i"
    jq -cn --arg t "$text" '$t' >>"$work/sent"
    if [ $((i % 2)) = 0 ]; then from=A to="$bob"; else from=B to="$alice"; fi
    if [ $((i % 5)) = 0 ]; then
        printf '%s\n' "$text" | "$from" --json send "$to" - >/dev/null && sends=$((sends + 1))
    else
        "$from" --json send "$to" "$text" >/dev/null && sends=$((sends + 1))
    fi
    if [ "$i" = 60 ] && [ -n "${DATABASE_URL:-}" ]; then
        dump_db
        pending=$(psql "$DATABASE_URL" -tAc "SELECT count(*) FROM messages WHERE encrypted_data IS NOT NULL")
        check "the database holds pending ciphertext while we look ($pending messages)" test "$pending" -ge 20
        check "no plaintext in any column of any table ($(wc -l <"$work/markers") texts, as text or hex)" \
            test "$(leaks_in "$work/dump")" = 0
        ids="'$(A --json whoami | jq -r .id)', '$(B --json whoami | jq -r .id)'"
        ours=$(psql "$DATABASE_URL" -tAc "SELECT count(*) FROM messages WHERE encrypted_data IS NOT NULL AND recipient_id IN ($ids)")
        olm=$(psql "$DATABASE_URL" -tAc "SELECT count(*) FROM messages WHERE encrypted_data IS NOT NULL AND recipient_id IN ($ids) AND get_byte(encrypted_data, 0) = 2")
        check "every envelope between them is version 2, Olm ($olm of $ours)" test "$olm" = "$ours" -a "$ours" -gt 0
    fi
    if [ $((i % 40)) = 0 ]; then inbox A; inbox B; fi
done
inbox A
inbox B
check "100 sends succeeded" test "$sends" = 100
sort "$work/sent" >"$work/sent.sorted"
cat "$work/shown-A" "$work/shown-B" | sort >"$work/shown.sorted"
check "all 100 arrived once and intact ($(wc -l <"$work/shown.sorted") shown)" cmp -s "$work/sent.sorted" "$work/shown.sorted"
check "nothing refused on the way" test "$(cat "$work"/dropped-* "$work"/held-* | wc -l)" = 0
inbox A
check "nothing shown twice (a second inbox is empty)" test "$(jq '.messages | length' "$work/inbox.json")" = 0

echo "== rotate-key loses nothing in flight; a changed key is refused until trust"
for i in 1 2 3; do new_text "$((200 + i))"; A send "$bob" "$text" >/dev/null; echo "$text" >>"$work/inflight"; done
new_text 210; B send "$alice" "$text" >/dev/null; before_rotation="$text"
check "bob rotates his key" B rotate-key
inbox B
check "bob reads the 3 messages sealed to his old key" \
    test "$(jq -c '[.messages[].text] | sort' "$work/inbox.json")" = "$(jq -Rsc 'split("\n")[:-1] | sort' "$work/inflight")"
new_text 211; after_rotation="$text"
check "bob can send with his new key" B send "$alice" "$after_rotation"
inbox A
# Version 2: both ride the session they already have, whose keys were agreed with the key Alice
# pinned for Bob (ENVELOPE.md); what the new key changes is where new sessions start.
check "alice opens bob's messages from before and after the rotation, on their session" \
    test "$(jq -c '[.messages[].text] | sort' "$work/inbox.json")" = "$(jq -cn --arg a "$before_rotation" --arg b "$after_rotation" '[$a, $b] | sort')"
check "  nothing held or dropped" test "$(jq '(.held | length) + (.dropped | length)' "$work/inbox.json")" = 0
new_text 212
check "alice's send to bob is refused while his key is unaccepted (5)" test "$(status A send "$bob" "$text")" = 5
check "  with a message naming trust" grep -q "messenger trust $bob" "$work/err"
check "contacts shows the pending change" grep -q "KEY CHANGED" <(A contacts)
check "trust with a wrong fingerprint changes nothing (5)" test "$(status A trust "$bob" --fingerprint "$fp")" = 5
newfp=$(B --json whoami | jq -r .fingerprint)
check "alice accepts bob's new key (checked fingerprint)" A trust "$bob" --fingerprint "$(sed -E 's/(.{4})/\1 /g' <<<"$newfp")"
check "alice can send to bob again (a new session, from his new key's prekeys)" A send "$bob" "$text"
inbox B
check "bob reads it" test "$(jq -r '.messages[0].text' "$work/inbox.json")" = "$text"

echo "== devices: two users with two devices each; every message reaches every device once"
code=$(A --json link | jq -r .code)
check "a link code is 12 Crockford base32 characters, shown in groups of 4" \
    grep -qE '^[0-9A-HJKMNP-TV-Z]{4}-[0-9A-HJKMNP-TV-Z]{4}-[0-9A-HJKMNP-TV-Z]{4}$' <<<"$code"
check "alice's laptop joins her account with it" A2 --json join "$alice" "$(tr 'A-Z' 'a-z' <<<"$code")" --label "alice laptop"
check "the code is used up (3)" \
    test "$(MESSENGER_PASSWORD="$pa" status "$MESSENGER" --profile a3 join "$alice" "$code")" = 3
check "the laptop is device 2" test "$(A2 --json whoami | jq -r .device_id)" = 2
check "alice's phone lists the laptop as not accepted yet" grep -q "device 2  alice laptop.*not accepted" <(A devices)
a2fp=$(A2 --json whoami | jq -r .fingerprint)
check "alice's phone accepts her laptop (checked fingerprint)" A trust "$alice" --fingerprint "$a2fp"
check "  and lists it as accepted" test "$(A --json devices | jq '[.devices[] | select(.accepted)] | length')" = 2
code=$(B --json link | jq -r .code)
check "bob's laptop joins his account" B2 join "$bob" "$code" --label "bob laptop"
b2fp=$(B2 --json whoami | jq -r .fingerprint)
check "bob's phone accepts his laptop" B trust "$bob" --fingerprint "$b2fp"
new_text 400
check "alice's send to bob is refused until she accepts his new device (5)" test "$(status A send "$bob" "$text")" = 5
check "  naming it and its fingerprint" grep -q "new device 2 with key $(sed -E 's/(.{4})/\1 /g; s/ $//' <<<"$b2fp")" "$work/err"
check "alice accepts bob's laptop" A trust "$bob" --fingerprint "$b2fp"
check "bob accepts alice's laptop" B trust "$alice" --fingerprint "$a2fp"
: >"$work/device-sends"
for i in $(seq 401 440); do
    new_text "$i"
    case $((i % 4)) in # sender, its other device (a copy), the recipient's two devices
        0) from=A other=A2 to="$bob" r1=B r2=B2 ;;
        1) from=A2 other=A to="$bob" r1=B r2=B2 ;;
        2) from=B other=B2 to="$alice" r1=A r2=A2 ;;
        *) from=B2 other=B to="$alice" r1=A r2=A2 ;;
    esac
    if "$from" --json send "$to" "$text" >"$work/out"; then
        jq -c '[(.messages | length), .copies]' "$work/out" >>"$work/device-sends"
        for w in "$r1" "$r2" "$other"; do jq -cn --arg t "$text" '$t' >>"$work/expected-$w"; done
    else
        fail "send $i from $from"
    fi
    if [ "$i" = 420 ] && [ -n "${DATABASE_URL:-}" ]; then
        dump_db
        check "no plaintext in the database while 4 devices' mail is pending" test "$(leaks_in "$work/dump")" = 0
    fi
done
check "each send sealed for both of the recipient's devices and copied to the sender's other" \
    test "$(sort -u "$work/device-sends")" = "[2,1]"
for w in A A2 B B2; do : >"$work/shown-$w"; inbox "$w"; inbox "$w"; done
for w in A A2 B B2; do
    check "device $w shows each of its $(wc -l <"$work/expected-$w") messages once and intact" \
        cmp -s <(sort "$work/expected-$w") <(sort "$work/shown-$w")
done
check "a copy shows whom it was sent to" grep -q "you (device 2) to $bob" <(new_text 441; A2 send "$bob" "$text" >/dev/null; A inbox)
check "nothing refused on any device" test "$(cat "$work"/dropped-A2 "$work"/dropped-B2 "$work"/held-A2 "$work"/held-B2 | wc -l)" = 0
check "alice removes her laptop from her phone" A remove-device 2
check "the laptop's token no longer works, nor a new login (3)" test "$(status A2 inbox)" = 3
check "  and it says the device may have been removed" grep -q "device 2) was removed from the account" "$work/err"
new_text 450
check "bob's send after the removal reaches alice's phone alone (devices_changed, sealed again)" \
    test "$(B2 --json send "$alice" "$text" | jq '.messages | length')" = 1
inbox A
check "alice's phone reads it" test "$(jq -r '.messages[0].text' "$work/inbox.json")" = "$text"
check "bob's laptop removes itself, erasing its profile" B2 remove-device 2 --yes
check "  gone" test ! -e "$MESSENGER_HOME/b2"
inbox B
check "bob's phone holds no copy it cannot open" test "$(jq '(.dropped | length) + (.held | length)' "$work/inbox.json")" = 0

echo "== tokens are renewed by logging in again"
tok="$MESSENGER_HOME/a/token.json"
jq '.access_token = "eyJhbGciOiJIUzI1NiJ9.e30.revoked"' "$tok" >"$tok.new" && mv "$tok.new" "$tok" && chmod 600 "$tok"
check "a refused token is replaced by a new login" A whoami
jq '.expires_at = "2000-01-01T00:00:00Z"' "$tok" >"$tok.new" && mv "$tok.new" "$tok" && chmod 600 "$tok"
check "an expired token is replaced by a new login" A whoami
check "the token file is mode 0600" test "$(stat -c %a "$tok")" = 600
check "no password in the profile" bash -c "! grep -rqF -- '$pa' '$MESSENGER_HOME'"
rm "$tok"
check "a wrong password is refused (3)" test "$(MESSENGER_PASSWORD=wrong-password-1 status "$MESSENGER" --profile a whoami)" = 3
check "without a password and a terminal, a clear refusal (3)" \
    test "$(status setsid -w "$MESSENGER" --profile a whoami </dev/null)" = 3

if [ -n "${DATABASE_URL:-}" ]; then
    echo "== envelopes the server (or anyone) replays, tampers with or re-addresses are refused"
    check "register carol" C --json register "$carol"
    new_text 300; genuine="$text"
    A send "$bob" "$genuine" >/dev/null
    b_id=$(B --json whoami | jq -r .id)
    c_id=$(C --json whoami | jq -r .id)
    env=$(psql "$DATABASE_URL" -tAc "SELECT encode(encrypted_data, 'base64') FROM messages
        WHERE recipient_id = '$b_id' AND encrypted_data IS NOT NULL ORDER BY id DESC LIMIT 1" | tr -d '\n')
    tampered=$(base64 -d <<<"$env" | python3 -c 'import sys; b = bytearray(sys.stdin.buffer.read()); b[-5] ^= 1; sys.stdout.buffer.write(b)' | base64 -w0)
    atok=$(jq -r .access_token "$MESSENGER_HOME/a/token.json" 2>/dev/null || true)
    [ -n "$atok" ] && [ "$atok" != null ] || { A login >/dev/null; atok=$(jq -r .access_token "$MESSENGER_HOME/a/token.json"); }
    post() { # recipient-id base64 -> HTTP status
        curl -s -o /dev/null -w '%{http_code}' "$api/messages" -H "authorization: Bearer $atok" \
            -H 'content-type: application/json' -H "Idempotency-Key: e2e-$(rand)" \
            --data-binary "{\"recipient_id\":\"$1\",\"encrypted_data\":\"$2\"}"
    }
    check "the replayed envelope is accepted by the server" test "$(post "$b_id" "$env")" = 201
    check "the tampered envelope is accepted by the server" test "$(post "$b_id" "$tampered")" = 201
    check "the envelope re-addressed to carol is accepted by the server" test "$(post "$c_id" "$env")" = 201
    inbox B
    check "bob sees the genuine message once" test "$(jq -c '[.messages[].text]' "$work/inbox.json")" = "$(jq -cn --arg t "$genuine" '[$t]')"
    check "bob refuses the replay" jq -e '.dropped | map(select(.reason | test("replays message"))) | length == 1' "$work/inbox.json"
    check "bob refuses the tampered one" jq -e '.dropped | map(select(.reason | test("does not open"))) | length == 1' "$work/inbox.json"
    inbox C
    check "carol refuses the one sealed for bob" jq -e '(.messages | length == 0) and (.dropped | map(select(.reason | test("does not open"))) | length == 1)' "$work/inbox.json"
    # A first message, so a pre-key message from one of bob's one-time keys, in flight across his
    # rotation: the Olm account his old key had still opens it (kept as long as messages live).
    new_text 310; first_contact="$text"
    check "carol's first message to bob (a new session, from his prekeys)" C send "$bob" "$first_contact"
    check "bob rotates his key before reading it" B rotate-key
    inbox B
    check "bob reads it: a prekey claimed before a rotation still opens after it" \
        test "$(jq -c '[.messages[].text]' "$work/inbox.json")" = "$(jq -cn --arg t "$first_contact" '[$t]')"
    check "  nothing dropped" test "$(jq '(.held | length) + (.dropped | length)' "$work/inbox.json")" = 0
    check "delete carol" C delete-account --yes
fi

if [ -n "${LOG_FILE:-}" ]; then
    check "no plaintext in the functions' log" test "$(leaks_in "$LOG_FILE")" = 0
    check "no password in the functions' log" bash -c "! grep -qF -e '$pa' -e '$pb' -e '$pc' '$LOG_FILE'"
fi

echo "== delete-account"
check "delete-account needs --yes without a terminal (2)" test "$(status A delete-account </dev/null)" = 2
check "a wrong password deletes nothing (3)" test "$(MESSENGER_PASSWORD=wrong-password-2 status "$MESSENGER" --profile a delete-account --yes)" = 3
check "alice deletes her account" A delete-account --yes
check "her profile is erased" test ! -e "$MESSENGER_HOME/a"
check "bob can no longer find her (4)" test "$(status B send "$alice" "anyone there?")" = 4
check "bob deletes his account" B delete-account --yes

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
