#!/usr/bin/env bash
# End-to-end test of the browser client: headless Debian Chromium driven by playwright-core,
# against two gateway instances on one Redis behind nginx (all started by the test itself on
# free ports). Installs what a fresh Debian machine lacks, builds the gateway, runs the test.
#
#   bash e2e/ci.sh              # install missing packages, npm ci, build, test
#   bash e2e/ci.sh --deps-only  # only install the system and npm packages
#
# GATEWAY_BIN may point at an already built binary (the build step is then skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

need_apt=()
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need_apt+=(nginx)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
# Screenshots need at least one font (Chromium is installed without its recommends).
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need_apt+=(fonts-dejavu-core)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "e2e: installing ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  # The test runs its own nginx and redis-server on free ports, whatever the packages start.
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
chromium --version
"$(command -v nginx || echo /usr/sbin/nginx)" -v
redis-server --version

echo "e2e: npm ci"
(cd e2e && npm ci --no-audit --no-fund)

if [ "${1:-}" = "--deps-only" ]; then
  exit 0
fi

if [ -z "${GATEWAY_BIN:-}" ]; then
  echo "e2e: building the gateway (release)"
  cargo build --release -p chat-gateway --locked
  target_dir="${CARGO_TARGET_DIR:-$root/target}"
  export GATEWAY_BIN="$target_dir/release/chat-gateway"
fi

echo "e2e: running the browser test (gateway: $GATEWAY_BIN)"
status=0
(cd e2e && node --test --test-concurrency=1 --test-reporter=spec test/) || status=$?
if [ "$status" -ne 0 ]; then
  echo "e2e: FAILED (exit $status); screenshots in artifacts/, process logs in artifacts/e2e-logs/:"
  for f in artifacts/e2e-logs/*.log; do
    [ -f "$f" ] || continue
    echo "----- $f (last 40 lines)"
    tail -n 40 "$f"
  done
fi
exit "$status"
