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
# Besides the spec output, lib/count-reporter.mjs counts the tests that really ran:
# `node --test` exits 0 when it finds no test file, or a file that declares no test.
counts="$(mktemp /tmp/e2e-counts.XXXXXX)"
trap 'rm -f "$counts"' EXIT
(cd e2e && node --test --test-concurrency=1 \
  --test-reporter=spec --test-reporter-destination=stdout \
  --test-reporter=./lib/count-reporter.mjs --test-reporter-destination="$counts" \
  test/) || status=$?
summary="$(grep '^e2e-tests:' "$counts" || true)"
echo "e2e: ${summary:-no count of the tests that ran (lib/count-reporter.mjs wrote nothing)}"
ran="$(sed -n 's/.* ran=\([0-9]*\).*/\1/p' <<< "$summary")"
if [ "$status" -eq 0 ] && [ "${ran:-0}" -eq 0 ]; then
  echo "e2e: FAILED: no test ran"
  status=1
fi
if [ "$status" -ne 0 ]; then
  echo "e2e: FAILED (exit $status); screenshots in artifacts/, process logs in artifacts/e2e-logs/:"
  for f in artifacts/e2e-logs/*.log artifacts/e2e-logs/*/*.log; do
    [ -f "$f" ] || continue
    echo "----- $f (last 40 lines)"
    tail -n 40 "$f"
  done
fi
exit "$status"
