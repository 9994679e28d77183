#!/usr/bin/env bash
# The README's two walks, run as written against a running API ($1, e.g. make dev's), so that
# they cannot drift from the code: "A walk through the API" (curl) and "Try it with the client"
# (the messenger CLI). scripts/e2e.sh runs it; by hand: bash scripts/readme-run.sh http://127.0.0.1:9000
#
# The curl walk runs as one script, with API= pointed at $1. Each trailing comment that is a
# literal answer (a status such as `# 204`, `# true`, or a JSON body) must appear in its output,
# in order; comments in words are not checked.
# The client section runs line by line, as a reader would type it in its terminals: a comment
# naming an exit status (`exit 5`) is the status that line must end with, every other line must
# succeed; `inbox --follow` runs in the background until the comment that says Ctrl-C, and must
# have shown every message sent meanwhile; the code `link` prints replaces XXXX-XXXX-XXXX.
# Both walks register fixed names: accounts a failed earlier run left under those names are
# deleted first (with the walks' own passwords). Needs curl, jq, openssl and the messenger binary
# ($MESSENGER, default target/debug/messenger: `cargo build -p client`).
set -euo pipefail
cd "$(dirname "$0")/.."

api="${1:?usage: scripts/readme-run.sh API_URL}"
api="${api%/}"
messenger="${MESSENGER:-$PWD/target/debug/messenger}"
work="$(mktemp -d)"
follow_pid=""
trap '[ -n "$follow_pid" ] && kill "$follow_pid" 2>/dev/null; rm -rf "$work"' EXIT
failed=0
fail() { failed=$((failed + 1)); echo "FAIL: $*"; }

# block HEADING: the first ```sh block under the README heading HEADING.
block() {
    awk -v heading="$1" '$0 == heading { inside = 1; next }
        inside && /^```sh$/ { code = 1; next }
        code && /^```$/ { exit }
        code' README.md
}
walk="$(block '## A walk through the API')"
client="$(block '## Try it with the client')"
[ -n "$walk" ] && [ -n "$client" ] || { echo "readme-run: a walk's heading or block is gone from README.md"; exit 1; }
grep -qx 'API=http://127.0.0.1:9000' <<<"$walk" || { echo "readme-run: the walk no longer sets API=http://127.0.0.1:9000"; exit 1; }

# The client section's password (it asks on a terminal; MESSENGER_PASSWORD is its documented
# alternative) and where its profiles go.
export MESSENGER_PASSWORD="readme-walk-password"
export MESSENGER_API="$api" XDG_CONFIG_HOME="$work/config"
unset MESSENGER_HOME

# delete_leftover NAME PASSWORD: the account NAME, when it exists and PASSWORD is its password.
delete_leftover() {
    local token
    token=$(curl -s "$api/login" -H 'content-type: application/json' \
        -d "{\"name\":\"$1\",\"password\":\"$2\"}" | jq -r '.access_token // empty' 2>/dev/null || true)
    [ -z "$token" ] && return 0
    echo "readme-run: deleting $1, left by an earlier run"
    curl -s -o /dev/null -X DELETE "$api/me" -H "authorization: Bearer $token" \
        -H 'content-type: application/json' -d "{\"password\":\"$2\"}"
}
while read -r name password; do
    delete_leftover "$name" "$password"
done < <(grep -oE '"name":"[A-Za-z]+","password":"[a-z-]+"' <<<"$walk" | sort -u | jq -Rr 'capture("\"name\":\"(?<n>[A-Za-z]+)\",\"password\":\"(?<p>[^\"]+)\"") | "\(.n) \(.p)"')
for name in $(grep -oE 'register [a-z]+$' <<<"$(sed 's/ *#.*//' <<<"$client")" | cut -d' ' -f2); do
    delete_leftover "$name" "$MESSENGER_PASSWORD"
done

# --- The curl walk ---
sed "s|^API=http://127.0.0.1:9000\$|API=$api|" <<<"$walk" > "$work/walk.sh"
# (Through a pipe: the walk's `tee /dev/stderr` would write over a file given as both outputs.)
if ! bash -euo pipefail "$work/walk.sh" 2>&1 | cat > "$work/walk.out"; then
    fail "the README's walk stopped with an error"
    tail -5 "$work/walk.out"
fi
# The answers its comments promise, in order: `# 204`-like statuses end a line of their own.
rest="$(cat "$work/walk.out")"$'\n'   # (what $(...) took off the end)
# A status (curl -w '%{http_code}\n') or a jq boolean ends its line and follows no digit or
# letter (the body before it has no newline); a JSON body is matched as written.
found() { # NEEDLE: consumes $rest up to the first acceptable match
    local needle=$1 bounded=$2 before after
    after="$rest"
    while [[ "$after" == *"$needle"* ]]; do
        before="${after%%"$needle"*}"
        after="${after#*"$needle"}"
        if [ "$bounded" = 0 ] || [[ ! "${before: -1}" =~ [[:alnum:]] ]]; then
            rest="$after"
            return 0
        fi
    done
    return 1
}
while IFS= read -r promised; do
    case "$promised" in
        [0-9][0-9][0-9] | true | false) found "$promised"$'\n' 1 ;;
        *) found "$promised" 0 ;;
    esac || fail "the walk promises ${promised} (a comment) where its output has none"
done < <(grep -oE '# ([0-9]{3}|true|false|\{.*\})$' <<<"$walk" | cut -c3-)
walked=$(grep -cE '# ([0-9]{3}|true|false|\{.*\})$' <<<"$walk")
echo "readme-run: the walk ran, $walked promised answers checked"

# --- The client section ---
export PATH="$(dirname "$messenger"):$PATH"
code=""
ran=0
sent_while_following=()
while IFS= read -r line; do
    command="$(sed -E 's/[[:space:]]+#.*$//; s/^#.*$//' <<<"$line")"
    comment="$(sed -nE 's/^.*(^|[[:space:]])#[[:space:]]?//p' <<<"$line")"
    if [ -n "$follow_pid" ] && grep -q 'Ctrl-C' <<<"$comment"; then
        # It polls every 2 s: up to 5 s for what was sent to show.
        for _ in $(seq 1 25); do
            shown=1
            for text in "${sent_while_following[@]}"; do
                grep -qF -- "$text" "$work/follow.out" || shown=0
            done
            [ "$shown" = 1 ] && break
            sleep 0.2
        done
        kill "$follow_pid" 2>/dev/null || true
        wait "$follow_pid" 2>/dev/null || true
        follow_pid=""
        for text in "${sent_while_following[@]}"; do
            grep -qF -- "$text" "$work/follow.out" || fail "inbox --follow did not show \"$text\""
        done
    fi
    [ -z "$command" ] && continue
    case "$command" in
        "make dev") continue ;;
        *"cargo build -p client"*) command="${command/cargo build -p client && /}" ;;
    esac
    [ -n "$code" ] && command="${command//XXXX-XXXX-XXXX/$code}"
    expected=$(grep -oE 'exit [0-9]+' <<<"$comment" | head -n 1 | cut -d' ' -f2 || true)
    expected="${expected:-0}"
    ran=$((ran + 1))
    if [[ "$command" == *"inbox --follow"* ]]; then
        # exec: $! is the messenger process itself, which the kill below must reach.
        eval "exec $command" > "$work/follow.out" 2>&1 &
        follow_pid=$!
        sleep 1
        continue
    fi
    if [ -n "$follow_pid" ]; then
        text=$(sed -nE 's/.* send [a-z]+ "([^"]*)"$/\1/p; s/^echo "([^"]*)" \|.* send [a-z]+ -$/\1/p' <<<"$command")
        [ -n "$text" ] && sent_while_following+=("$text")
    fi
    set +e
    output="$(eval "$command" 2>&1 < /dev/null)"
    status=$?
    set -e
    if [ "$status" != "$expected" ]; then
        fail "\`$command\` ended with $status, the README says $expected: $(tail -n 2 <<<"$output")"
    fi
    if [[ "$command" == *" link" ]]; then
        code=$(grep -oE '[0-9A-Z]{4}-[0-9A-Z]{4}-[0-9A-Z]{4}' <<<"$output" | head -n 1)
        [ -n "$code" ] || fail "\`$command\` showed no link code"
    fi
done <<<"$client"
# Let a --follow that never met its Ctrl-C go.
[ -n "$follow_pid" ] && { kill "$follow_pid" 2>/dev/null || true; follow_pid=""; }
echo "readme-run: the client section ran, $ran commands"

[ "$failed" = 0 ] || { echo "readme-run: $failed failed"; exit 1; }
echo "readme-run: both README walks ran as written"
