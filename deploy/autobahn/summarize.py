#!/usr/bin/env python3
"""Summary and verdict of an Autobahn|Testsuite fuzzingclient report (called by run.sh).

    python3 summarize.py OUTDIR AGENT [EXPECTED_CASES]

Reads OUTDIR/index.json (wstest's machine-readable report) and each case's OUTDIR/<case>.json
for the reason of a failure. Prints the counts of `behavior` and of `behaviorClose`, per case
group and in all, the slowest cases, and every failed case with wstest's reason; the last line
is 'autobahn: N passed, N failed'. Exit status 1 when:
  - any case's behavior or behaviorClose is outside {OK, NON-STRICT, INFORMATIONAL}
    (UNIMPLEMENTED is tolerated only in groups 12 and 13, permessage-deflate, which the
    default case list leaves out);
  - the report holds no case, or fewer than EXPECTED_CASES (wstest's own count of the cases
    it was to run: it exits 0 and writes a short or empty report when the server is not
    listening or dies part-way).
"""
import collections
import json
import os
import sys

ACCEPTED = {"OK", "NON-STRICT", "INFORMATIONAL"}
UNIMPLEMENTED_OK_GROUPS = {"12", "13"}  # permessage-deflate: not offered by every server
GROUP_NAMES = {
    "1": "Framing", "2": "Pings/Pongs", "3": "Reserved bits", "4": "Opcodes",
    "5": "Fragmentation", "6": "UTF-8 handling", "7": "Close handling",
    "9": "Limits/performance", "10": "Misc", "12": "WebSocket compression",
    "13": "WebSocket compression (different parameters)",
}


def case_key(case_id):
    return tuple(int(p) if p.isdigit() else p for p in case_id.split("."))


def case_ok(case_id, entry):
    group = case_id.split(".")[0]
    for field in ("behavior", "behaviorClose"):
        value = entry.get(field)
        if value in ACCEPTED:
            continue
        if value == "UNIMPLEMENTED" and group in UNIMPLEMENTED_OK_GROUPS:
            continue
        return False
    return True


def reason(outdir, entry):
    """wstest's own explanation of a case's outcome, from the case's JSON report."""
    try:
        with open(os.path.join(outdir, entry["reportfile"])) as f:
            report = json.load(f)
    except (KeyError, OSError, ValueError):
        return ""
    parts = [report.get("result") or "", report.get("resultClose") or ""]
    return " / ".join(p for p in parts if p)


def main(argv):
    if len(argv) not in (3, 4):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    outdir, agent = argv[1], argv[2]
    expected = int(argv[3]) if len(argv) == 4 and argv[3] else None
    index_path = os.path.join(outdir, "index.json")
    try:
        with open(index_path) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        print(f"autobahn: cannot read {index_path}: {e}")
        print("autobahn: 0 passed, 1 failed")
        return 1
    cases = index.get(agent, {})

    behavior = collections.Counter(e.get("behavior") for e in cases.values())
    close = collections.Counter(e.get("behaviorClose") for e in cases.values())
    by_group = collections.defaultdict(lambda: [0, 0])  # group -> [cases, failed]
    failed = []
    tolerated = []
    for case_id in sorted(cases, key=case_key):
        entry = cases[case_id]
        group = case_id.split(".")[0]
        by_group[group][0] += 1
        if not case_ok(case_id, entry):
            by_group[group][1] += 1
            failed.append(case_id)
        elif "UNIMPLEMENTED" in (entry.get("behavior"), entry.get("behaviorClose")):
            tolerated.append(case_id)

    def fmt(counter):
        order = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"]
        keys = sorted(counter, key=lambda k: (order.index(k) if k in order else len(order), str(k)))
        return ", ".join(f"{k} {counter[k]}" for k in keys) or "none"

    total_ms = sum(e.get("duration") or 0 for e in cases.values())
    print(f"autobahn: report {index_path}, agent {agent!r}: {len(cases)} cases"
          + (f" (wstest was to run {expected})" if expected is not None else ""))
    print(f"autobahn: behavior:      {fmt(behavior)}")
    print(f"autobahn: behaviorClose: {fmt(close)}")
    for group in sorted(by_group, key=int):
        n, bad = by_group[group]
        print(f"autobahn:   {group:>2}.* {GROUP_NAMES.get(group, ''):<20} {n:4d} cases, {bad} failed")
    slowest = sorted(cases.items(), key=lambda kv: -(kv[1].get("duration") or 0))[:5]
    if slowest:
        print(f"autobahn: time in cases {total_ms / 1000:.1f} s; slowest: "
              + ", ".join(f"{c} {e.get('duration', 0)} ms" for c, e in slowest))
    if tolerated:
        print(f"autobahn: UNIMPLEMENTED tolerated (compression groups): {len(tolerated)} cases")

    problems = []
    if not cases:
        problems.append(f"no case in the report for agent {agent!r} (was the server listening?)")
    elif expected is not None and len(cases) < expected:
        problems.append(f"only {len(cases)} of {expected} cases in the report (server gone part-way?)")
    for case_id in failed[:60]:
        e = cases[case_id]
        print(f"autobahn: FAILED {case_id}: behavior {e.get('behavior')}, behaviorClose "
              f"{e.get('behaviorClose')}, close code {e.get('remoteCloseCode')}: {reason(outdir, e)}")
    if len(failed) > 60:
        print(f"autobahn: ... and {len(failed) - 60} more failed cases (see {outdir}/index.html)")
    for p in problems:
        print(f"autobahn: ERROR {p}")

    missing = (expected - len(cases)) if expected is not None and len(cases) < expected else 0
    n_failed = len(failed) + missing + (1 if not cases and not missing else 0)
    n_passed = len(cases) - len(failed)
    print(f"autobahn: {n_passed} passed, {n_failed} failed")
    return 1 if n_failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
