#!/usr/bin/env bash
# Prints a PostgreSQL URL for local runs and tests, making sure the database exists:
#   1. $DATABASE_URL when set (used as given);
#   2. else the local server at 127.0.0.1:${LOCAL_PG_PORT:-5432} (user postgres, trust auth), database $1;
#   3. else a throwaway cluster under .local/pg (port 54329), started with the machine's
#      initdb/pg_ctl, as the `postgres` user when run as root (PostgreSQL refuses root).
# Usage: scripts/database-url.sh [database-name]   (default: messenger)
# For a cluster of one's own (scripts/soak-database.sh): CLUSTER_ONLY=1 skips 1 and 2, and
# CLUSTER_DIR, CLUSTER_PORT and CLUSTER_OPTIONS (extra `-c name=value` settings) shape 3.
set -euo pipefail
cd "$(dirname "$0")/.."
name="${1:-messenger}"

if [ -n "${DATABASE_URL:-}" ] && [ -z "${CLUSTER_ONLY:-}" ]; then
    echo "$DATABASE_URL"
    exit 0
fi

pg_bin() {
    command -v "$1" 2>/dev/null && return
    ls /usr/lib/postgresql/*/bin/"$1" 2>/dev/null | sort -V | tail -n 1
}

create_db() { # host port
    local exists
    exists=$(psql -h "$1" -p "$2" -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$name'")
    if [ "$exists" != "1" ]; then
        psql -h "$1" -p "$2" -U postgres -d postgres -qc "CREATE DATABASE \"$name\"" >&2
    fi
    echo "postgres://postgres@$1:$2/$name"
}

local_port="${LOCAL_PG_PORT:-5432}"
if [ -z "${CLUSTER_ONLY:-}" ] && pg_isready -q -h 127.0.0.1 -p "$local_port" -t 2 2>/dev/null; then
    create_db 127.0.0.1 "$local_port"
    exit 0
fi

# No local server: a throwaway cluster of our own.
port="${CLUSTER_PORT:-54329}"
dir="${CLUSTER_DIR:-$PWD/.local/pg}"
run_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
if ! pg_isready -q -h 127.0.0.1 -p "$port" -t 1 2>/dev/null; then
    echo "==> starting a throwaway cluster in $dir (port $port)" >&2
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres: "$dir"
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        run_pg "$(pg_bin initdb)" -D "$dir/data" -U postgres --auth=trust -E UTF8 >/dev/null
    fi
    run_pg "$(pg_bin pg_ctl)" -D "$dir/data" -l "$dir/server.log" -w \
        -o "-p $port -c listen_addresses=127.0.0.1 -k $dir ${CLUSTER_OPTIONS:-}" start >&2
fi
create_db 127.0.0.1 "$port"
