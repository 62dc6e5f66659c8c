#!/usr/bin/env bash
# The gateway's own WebSocket transport against the Autobahn|Testsuite (called by .ci/run).
#
#   bash deploy/autobahn/ci.sh [OUTDIR]        # OUTDIR default: <repo>/artifacts/autobahn
#
# 1. builds the echo server crates/testkit/examples/autobahn_echo.rs (debug; after
#    `cargo test --workspace` it is already built, since cargo test builds examples)
# 2. starts it on a free port (it binds port 0 and prints its address), waits for it
# 3. deploy/autobahn/install.sh (wstest; reused when already installed)
# 4. deploy/autobahn/run.sh PORT OUTDIR: cases 1.*–7.*, 9.*, no exclusions
# 5. stops the server
# Exit status: run.sh's (0 only if every case is OK, NON-STRICT or INFORMATIONAL), or 1 if
# the server could not be built or started, or died during the run.
#
# Environment: as run.sh's; AUTOBAHN_TIMEOUT defaults to 240 s here (a run takes about 30 s).
set -euo pipefail
cd "$(dirname "$0")/../.."
outdir="${1:-artifacts/autobahn}"
mkdir -p "$outdir"
outdir="$(cd "$outdir" && pwd)"
export AUTOBAHN_TIMEOUT="${AUTOBAHN_TIMEOUT:-240}"

t_all=$(date +%s)
elapsed() { echo "$(( $(date +%s) - $1 )) s"; }

t0=$(date +%s)
cargo build --locked -p chat-testkit --example autobahn_echo
bin="${CARGO_TARGET_DIR:-target}/debug/examples/autobahn_echo"
echo "autobahn-ci: built $bin in $(elapsed "$t0")"

log="$outdir/server.log"
"$bin" 0 >"$log" 2>&1 &
server=$!
stop_server() {
  kill -INT "$server" 2>/dev/null || return 0
  for _ in $(seq 50); do kill -0 "$server" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$server" 2>/dev/null || true
}
trap stop_server EXIT

port=""
for _ in $(seq 300); do
  port="$(sed -n 's|^autobahn_echo: ws://127\.0\.0\.1:\([0-9]*\)/$|\1|p' "$log")"
  [ -n "$port" ] && break
  kill -0 "$server" 2>/dev/null || break
  sleep 0.1
done
if [ -z "$port" ]; then
  echo "autobahn-ci: the echo server did not start:" >&2
  sed 's/^/autobahn-ci: | /' "$log" >&2
  exit 1
fi
echo "autobahn-ci: echo server (pid $server) on ws://127.0.0.1:$port/"

t0=$(date +%s)
# (not `tee /dev/stderr`: reopening a log file that stderr is redirected to writes over it)
bash deploy/autobahn/install.sh | tee "$outdir/install.log"
wstest="$(tail -n 1 "$outdir/install.log")"
echo "autobahn-ci: install.sh took $(elapsed "$t0")"

t0=$(date +%s)
status=0
AUTOBAHN_WSTEST="$wstest" bash deploy/autobahn/run.sh "$port" "$outdir" || status=$?
echo "autobahn-ci: run.sh took $(elapsed "$t0") (exit $status)"

if ! kill -0 "$server" 2>/dev/null; then
  echo "autobahn-ci: the echo server died during the run:" >&2
  tail -n 20 "$log" | sed 's/^/autobahn-ci: | /' >&2
  status=1
fi
stop_server
trap - EXIT
echo "autobahn-ci: done in $(elapsed "$t_all"), exit $status"
exit "$status"
