#!/usr/bin/env bash
# Prints the URL of the soak run's database, `messenger_soak`, on a PostgreSQL cluster of its own
# under .local/soak-pg (port ${SOAK_PG_PORT:-54331}), started here with the machine's
# initdb/pg_ctl when it is not running. Its own cluster because the soak measures what
# autovacuum does, and a shared or CI server may run with autovacuum off (this machine's does);
# and because the soak's time is compressed (a week of turnover in minutes), autovacuum looks at
# the database every second (autovacuum_naptime=1s, the default is 60 s, RDS's 15 s), so a run
# of minutes gives it as many chances, relative to the churn, as a week gives production.
# Everything else is PostgreSQL's default. SOAK_DATABASE_URL overrides all of this.
# `make clean-local` stops it with the rest of .local.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${SOAK_DATABASE_URL:-}" ]; then
    echo "$SOAK_DATABASE_URL"
    exit 0
fi

pg_bin() {
    command -v "$1" 2>/dev/null && return
    ls /usr/lib/postgresql/*/bin/"$1" 2>/dev/null | sort -V | tail -n 1
}
run_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

port="${SOAK_PG_PORT:-54331}"
dir="$PWD/.local/soak-pg"
if ! pg_isready -q -h 127.0.0.1 -p "$port" -t 1 2>/dev/null; then
    echo "==> starting the soak cluster in $dir (port $port)" >&2
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres: "$dir"
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        run_pg "$(pg_bin initdb)" -D "$dir/data" -U postgres --auth=trust -E UTF8 >/dev/null
    fi
    run_pg "$(pg_bin pg_ctl)" -D "$dir/data" -l "$dir/server.log" -w \
        -o "-p $port -c listen_addresses=127.0.0.1 -k $dir -c autovacuum=on -c autovacuum_naptime=1 -c log_autovacuum_min_duration=0 -c max_connections=50" \
        start >&2
fi
exists=$(psql -h 127.0.0.1 -p "$port" -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'messenger_soak'")
if [ "$exists" != "1" ]; then
    psql -h 127.0.0.1 -p "$port" -U postgres -d postgres -qc 'CREATE DATABASE messenger_soak' >&2
fi
echo "postgres://postgres@127.0.0.1:$port/messenger_soak"
