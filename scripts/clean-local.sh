#!/usr/bin/env bash
# `make clean-local`: stops the throwaway clusters under .local/ (`make dev`'s, `make soak`'s and the
# end-to-end run's), then removes .local/. Each cluster is stopped by the user that owns its data directory (the one
# PostgreSQL runs as: `postgres` when the cluster was started by root, else whoever started it),
# and nothing is removed while any of their servers still runs.
set -euo pipefail
cd "$(dirname "$0")/.."

pg_bin() {
    command -v "$1" 2>/dev/null && return
    ls /usr/lib/postgresql/*/bin/"$1" 2>/dev/null | sort -V | tail -n 1
}

# The server's pid when the cluster in $1 is running, else nothing (a stale postmaster.pid, left by
# a crash or a reboot, names a process that is gone or is no postgres).
running_pid() {
    local pid
    [ -f "$1/postmaster.pid" ] || return 0
    pid=$(head -n 1 "$1/postmaster.pid")
    if [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && grep -q '^postgres' "/proc/$pid/comm"; then
        echo "$pid"
    fi
}

for data in .local/pg/data .local/soak-pg/data .local/e2e-pg/data; do
    [ -d "$data" ] || continue
    pid=$(running_pid "$data")
    [ -n "$pid" ] || continue
    owner=$(stat -c %U "$data")
    pg_ctl=$(pg_bin pg_ctl)
    if [ -z "$pg_ctl" ]; then
        echo "clean-local: $data is served by PostgreSQL (pid $pid), and pg_ctl is not found to stop it; nothing removed" >&2
        exit 1
    fi
    if [ "$(id -un)" = "$owner" ]; then
        echo "==> stopping the cluster in $data (pid $pid)" >&2
        "$pg_ctl" -D "$data" stop -m fast -w >&2 \
            || { echo "clean-local: pg_ctl could not stop $data; nothing removed" >&2; exit 1; }
    elif [ "$(id -u)" = 0 ]; then
        echo "==> stopping the cluster in $data (pid $pid) as $owner" >&2
        runuser -u "$owner" -- "$pg_ctl" -D "$data" stop -m fast -w >&2 \
            || { echo "clean-local: pg_ctl could not stop $data; nothing removed" >&2; exit 1; }
    else
        echo "clean-local: $data belongs to $owner and its server (pid $pid) runs; stop it as $owner" \
            "(pg_ctl -D $data stop) or run make clean-local as $owner or root; nothing removed" >&2
        exit 1
    fi
done

for data in .local/pg/data .local/soak-pg/data .local/e2e-pg/data; do
    pid=$(running_pid "$data")
    if [ -n "$pid" ]; then
        echo "clean-local: the server of $data (pid $pid) still runs; nothing removed" >&2
        exit 1
    fi
done
rm -rf .local
