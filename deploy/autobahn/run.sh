#!/usr/bin/env bash
# Autobahn|Testsuite fuzzing client (wstest 0.8.2) against a WebSocket echo server.
#
#   bash deploy/autobahn/run.sh PORT [OUTDIR]     # OUTDIR default: <repo>/artifacts/autobahn
#
# The server must already listen on ws://127.0.0.1:PORT/ and echo every text and binary
# message back. Runs the cases of fuzzingclient.json (1.*–7.* and 9.*; group 10, misc, and
# 12–13, permessage-deflate, are left out; 0.8.2 has no 8 or 11), writes wstest's report to OUTDIR (index.html to read,
# index.json to parse, one .html/.json per case, wstest.log), then prints summarize.py's
# summary. Exit status 0 only if every case's behavior and behaviorClose is OK, NON-STRICT or
# INFORMATIONAL and every case wstest was to run is in the report.
#
# Environment:
#   AUTOBAHN_WSTEST   wstest to use (default: deploy/autobahn/install.sh, which installs it
#                     once and then reuses it)
#   AUTOBAHN_CASES    comma-separated case patterns instead of the template's, e.g. "1.*,9.1.*"
#   AUTOBAHN_AGENT    agent name in the report (default chat-gateway)
#   AUTOBAHN_TIMEOUT  seconds before wstest is stopped (default 1200)
#   AUTOBAHN_WAIT     seconds to wait for the port to accept connections (default 15)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
usage() { echo "usage: $0 PORT [OUTDIR]" >&2; exit 2; }
if [ $# -lt 1 ] || [ $# -gt 2 ]; then usage; fi
port="$1"
if ! [[ "$port" =~ ^[0-9]{1,5}$ ]] || [ "$port" -lt 1 ] || [ "$port" -gt 65535 ]; then usage; fi
outdir="${2:-$here/../../artifacts/autobahn}"  # default: the repository's artifacts/ (git-ignored)
agent="${AUTOBAHN_AGENT:-chat-gateway}"
url="ws://127.0.0.1:$port/"
export PYTHONWARNINGS=ignore  # cryptography's "Python 2 is no longer supported" on every start

if [ -n "${AUTOBAHN_WSTEST:-}" ]; then
  wstest="$AUTOBAHN_WSTEST"
else
  wstest="$(bash "$here/install.sh" | tee /dev/stderr | tail -n 1)"  # progress on stderr
fi
[ -x "$wstest" ] || { echo "autobahn: no wstest at '$wstest'" >&2; exit 1; }

# wstest does not fail when nothing listens: it writes an empty report and exits 0.
python3 - "$port" "${AUTOBAHN_WAIT:-15}" <<'EOF' || exit 1
import socket, sys, time
port, wait = int(sys.argv[1]), float(sys.argv[2])
deadline = time.monotonic() + wait
while True:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        break
    except OSError as e:
        if time.monotonic() > deadline:
            sys.exit(f"autobahn: nothing accepts connections on 127.0.0.1:{port} after {wait:g} s ({e})")
        time.sleep(0.2)
EOF

mkdir -p "$outdir"
outdir="$(cd "$outdir" && pwd)"
# Only what an earlier run of this script left there, so that no stale result is read.
rm -f "$outdir/index.json" "$outdir/index.html" "$outdir/wstest.log" "$outdir/fuzzingclient.json" \
      "$outdir/${agent//[^A-Za-z0-9]/_}"_case_*.json "$outdir/${agent//[^A-Za-z0-9]/_}"_case_*.html
spec="$outdir/fuzzingclient.json"
python3 - "$here/fuzzingclient.json" "$spec" "$outdir" "$agent" "$url" "${AUTOBAHN_CASES:-}" <<'EOF'
import json, sys
template, spec, outdir, agent, url, cases = sys.argv[1:]
with open(template) as f:
    s = json.load(f)
s["outdir"] = outdir
s["servers"] = [{"agent": agent, "url": url}]
if cases:
    s["cases"] = [c.strip() for c in cases.split(",") if c.strip()]
with open(spec, "w") as f:
    json.dump(s, f, indent=2)
print(f"autobahn: cases {', '.join(s['cases'])} (excluded: {', '.join(s['exclude-cases']) or 'none'}) against {url}")
EOF

echo "autobahn: wstest -m fuzzingclient, log in $outdir/wstest.log"
t0=$(date +%s)
status=0
(cd "$outdir" && timeout --kill-after=10 "${AUTOBAHN_TIMEOUT:-1200}" \
   "$wstest" -m fuzzingclient -s "$spec") > "$outdir/wstest.log" 2>&1 || status=$?
echo "autobahn: wstest finished in $(( $(date +%s) - t0 )) s (exit $status)"
if [ "$status" -ne 0 ]; then
  [ "$status" -eq 124 ] && echo "autobahn: wstest stopped after ${AUTOBAHN_TIMEOUT:-1200} s"
  tail -n 20 "$outdir/wstest.log" | sed 's/^/autobahn: | /'
fi
{ grep "^Connection to .* failed" "$outdir/wstest.log" || true; } | head -n 3 | sed 's/^/autobahn: | /'
expected="$(sed -n 's/^Ok, will run \([0-9][0-9]*\) test cases.*/\1/p' "$outdir/wstest.log" | head -n 1)"

verdict=0
python3 "$here/summarize.py" "$outdir" "$agent" "$expected" || verdict=$?
if [ -f "$outdir/index.html" ]; then echo "autobahn: report $outdir/index.html"; fi
if [ "$status" -ne 0 ]; then echo "autobahn: FAILED: wstest exited $status"; verdict=1; fi
exit "$verdict"
