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

# database-url.sh's throwaway cluster, in a directory and on a port of its own.
CLUSTER_ONLY=1 CLUSTER_DIR="$PWD/.local/soak-pg" CLUSTER_PORT="${SOAK_PG_PORT:-54331}" \
    CLUSTER_OPTIONS="-c autovacuum=on -c autovacuum_naptime=1 -c log_autovacuum_min_duration=0 -c max_connections=50" \
    exec bash scripts/database-url.sh messenger_soak
