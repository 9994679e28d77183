#!/usr/bin/env bash
# Prints the path of a headless Chromium for scripts/browser-cors.sh, installing Debian's
# chromium-headless-shell (else chromium) with apt-get when none is there: as root, or through
# `sudo -n`, quietly and without questions. On failure, prints one line saying why on stderr and
# exits 1; apt-get's own output is kept in $CHROMIUM_INSTALL_LOG (default: a temporary file).
# $CHROMIUM names a binary to use instead.
# Test tools that download their own browser (playwright install, puppeteer) cannot reach their
# hosts from every machine; Debian's packages come through the same mirror as everything else.
set -euo pipefail

find_chromium() {
    local candidate
    local candidates=(chromium-headless-shell chromium chromium-browser)
    [ -z "${CHROMIUM:-}" ] || candidates=("$CHROMIUM")
    for candidate in "${candidates[@]}"; do
        if command -v "$candidate" >/dev/null 2>&1; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

find_chromium && exit 0
if [ -n "${CHROMIUM:-}" ]; then
    echo "CHROMIUM=$CHROMIUM is not an executable" >&2
    exit 1
fi
command -v apt-get >/dev/null 2>&1 || { echo "no Chromium, and no apt-get to install one" >&2; exit 1; }
if [ "$(id -u)" = 0 ]; then
    as_root=()
elif sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
else
    echo "no Chromium, and installing it needs root (apt-get install chromium-headless-shell)" >&2
    exit 1
fi

log="${CHROMIUM_INSTALL_LOG:-$(mktemp)}"
install() {
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >>"$log" 2>&1
}
echo "==> installing Chromium from Debian's packages (about 100 MB to download)" >&2
# Package lists that are stale or absent (a fresh container) are refreshed once, then tried again.
install chromium-headless-shell || install chromium || {
    "${as_root[@]}" apt-get update -qq >>"$log" 2>&1 || true
    install chromium-headless-shell || install chromium
} || { echo "apt-get could not install chromium-headless-shell or chromium (see $log)" >&2; exit 1; }
find_chromium || { echo "Chromium installed, but no chromium-headless-shell or chromium on PATH" >&2; exit 1; }
