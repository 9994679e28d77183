#!/usr/bin/env bash
# make audit: the supply chain of the whole workspace (deny.toml) with cargo-deny, offline.
#  - advisories: RustSec, read from the snapshot in ../shared/advisory-db (ADVISORY_DB= to point
#    elsewhere); skipped with one line when it is absent;
#  - licences, bans (rsa, duplicate versions as warnings) and sources (crates.io only);
#  - path dependencies: only the workspace's own crates and vendor/.
set -euo pipefail
cd "$(dirname "$0")/.."

snapshot="${ADVISORY_DB:-../shared/advisory-db}"
checks=(bans licenses sources)

if [ -d "$snapshot/crates" ]; then
    # cargo-deny reads the database at <db-path>/<name>-<hash of db-urls> (deny.toml), with a .git
    # whose FETCH_HEAD time is the fetch time. Lay the snapshot out there: links, nothing copied.
    db=target/advisory-dbs/advisory-db-3157b0e258782691
    abs="$(cd "$snapshot" && pwd)"
    taken="$(grep -oE ' of [0-9]{4}-[0-9]{2}-[0-9]{2}' "$snapshot/README.md" 2>/dev/null | head -1 | cut -c5- || true)"
    if [ -z "$taken" ]; then
        # No README naming the commit: the newest advisory's date stands for the snapshot's.
        taken="$(grep -rhoE '^date = "[0-9]{4}-[0-9]{2}-[0-9]{2}"' "$snapshot/crates" | sort | tail -1 | cut -d'"' -f2)"
    fi
    mkdir -p "$db/.git"
    ln -sfn "$abs/crates" "$db/crates"
    if [ -d "$abs/rust" ]; then ln -sfn "$abs/rust" "$db/rust"; fi
    touch -d "$taken" "$db/.git/FETCH_HEAD"
    age=$(( ($(date +%s) - $(date -d "$taken" +%s)) / 86400 ))
    advisories=$(find -L "$db/crates" -name '*.md' | wc -l)
    echo "audit: RustSec advisory snapshot of $taken ($age days old, $advisories advisories) from $snapshot"
    if [ "$age" -gt 90 ]; then
        echo "audit: warning: the advisory snapshot is over 90 days old: refresh it (README, \"Dependencies, and why each is here\")"
    fi
    checks=(advisories "${checks[@]}")
else
    echo "audit: advisory check skipped: no RustSec snapshot at $snapshot (licences, bans and sources still checked)"
fi

# cargo-deny reads every crate of Cargo.lock, for every target (a build fetches only the host's):
# the sources are fetched first, then everything runs offline.
cargo fetch --locked --quiet

# Path dependencies have no source for cargo-deny to check: each must be a workspace member or
# under vendor/ (a patched crate, vendor/README.md).
metadata="$(cargo metadata --offline --format-version 1)"
printf '%s' "$metadata" | python3 -c '
import json, os, sys
meta = json.load(sys.stdin)
root = meta["workspace_root"]
members = set(meta["workspace_members"])
bad = [p["name"] + " " + p["version"] + " at " + os.path.dirname(p["manifest_path"])
       for p in meta["packages"]
       if p["source"] is None and p["id"] not in members
       and not p["manifest_path"].startswith(os.path.join(root, "vendor") + os.sep)]
for b in bad:
    print("audit: path dependency outside the workspace and vendor/: " + b)
sys.exit(1 if bad else 0)
'

# First without inclusion graphs (the duplicates' warnings alone would run to a thousand lines);
# when a check fails, again with the graph of each error (who pulls the crate in).
deny=(cargo deny --offline --color never)
if ! "${deny[@]}" check --show-stats --hide-inclusion-graph "${checks[@]}"; then
    echo "audit: FAILED; each error again, with the crates that pull it in:"
    "${deny[@]}" --log-level error check "${checks[@]}" || true
    echo "audit: FAILED: README \"Dependencies, and why each is here\" says what to do"
    exit 1
fi
