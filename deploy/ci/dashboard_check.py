#!/usr/bin/env python3
"""Checks the Grafana dashboard and the alert rules against the gateway's metric names.

    python3 deploy/ci/dashboard_check.py                          # from the repository root
    python3 deploy/ci/dashboard_check.py --promql-rules OUT.yml   # also write every query as
                                                                  # a recording rule, for
                                                                  # `promtool check rules OUT.yml`
    python3 deploy/ci/dashboard_check.py --exposition FILE|URL    # also compare the list below
                                                                  # with a live /metrics

What it checks:
  - deploy/grafana/dashboards/chat-gateway.json parses, has unique panel ids, fits the 24-column
    grid, and every panel (rows aside) has at least one target with a PromQL `expr`;
  - every panel and query variable uses the Prometheus data source through the `datasource`
    variable, whose default is the uid the provisioning file gives Prometheus;
  - every metric name a query reads is one of SERIES below (a histogram through its
    _bucket/_sum/_count), or Prometheus' own `up`; likewise the alert rules;
  - every series of SERIES is read by at least one panel (except those in UNGRAPHED).
With --exposition, every name of SERIES must be in the exposition, and every chat_* family of
the exposition in SERIES: a series added to the gateway then fails here until it is graphed
(or listed in UNGRAPHED, with the reason).

Prints one line per check and exits 1 if any failed. Needs PyYAML.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.request
from pathlib import Path

import yaml

from checks import check, summary

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/dashboards/chat-gateway.json"
DATASOURCES = ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml"
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
# How every panel, target and query variable names its data source.
DS = {"type": "prometheus", "uid": "${datasource}"}

# The gateway's series (GET /metrics; docs/operations.md), name -> type.
SERIES = {
    "chat_connections": "gauge",
    "chat_connections_opened_total": "counter",
    "chat_connections_refused_total": "counter",
    "chat_connections_closed_total": "counter",
    "chat_rooms_served": "gauge",
    "chat_room_subscriptions": "gauge",
    "chat_messages_received_total": "counter",
    "chat_messages_published_total": "counter",
    "chat_messages_delivered_total": "counter",
    "chat_bytes_sent_total": "counter",
    "chat_publish_duration_seconds": "histogram",
    "chat_delivery_lag_seconds": "histogram",
    "chat_errors_total": "counter",
    "chat_redis_up": "gauge",
    "chat_redis_reconnects_total": "counter",
    "chat_gaps_detected_total": "counter",
    "chat_backfilled_messages_total": "counter",
    "chat_epoch_resets_total": "counter",
    "chat_build_info": "gauge",
}
# Series no panel needs to show, with the reason. (None at present.)
UNGRAPHED: dict[str, str] = {}
# Prometheus' own series that queries may read.
PROMETHEUS_SERIES = {"up"}

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Grafana's variables, as promtool should see them (any valid value will do).
GRAFANA_VARS = {
    "$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h",
    "${job}": ".+", "$job": ".+", "${instance}": ".+", "$instance": ".+",
}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
                "unless", "bool", "offset", "inf", "nan"}



def rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def known_names() -> dict[str, str]:
    """Every name a query may read -> the series of SERIES it belongs to."""
    names = {}
    for name, kind in SERIES.items():
        if kind == "histogram":
            for suffix in HISTOGRAM_SUFFIXES:
                names[name + suffix] = name
        else:
            names[name] = name
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (enough for the queries written here:
    selectors, functions, aggregations with by/without, vector matching, ranges)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)       # strings
    e = re.sub(r"\{[^}]*\}", " ", e)                                         # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)                                        # ranges
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", e):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    # __name__="…" matchers name a series too.
    names.update(re.findall(r'__name__\s*=~?\s*"([^"]+)"', expr))
    return names


def substitute(expr: str) -> str:
    for var, value in sorted(GRAFANA_VARS.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, value)
    return expr


def all_panels(panels: list[dict]) -> list[dict]:
    out = []
    for p in panels:
        out.append(p)
        out.extend(all_panels(p.get("panels", [])))     # collapsed rows keep theirs inside
    return out


def dashboard(promql_rules: Path | None) -> set[str]:
    """Checks the dashboard; returns the series (of SERIES) its panels read."""
    print(rel(DASHBOARD))
    d = json.loads(DASHBOARD.read_text())
    check(d.get("uid") == "chat-gateway" and bool(d.get("title")), f"uid {d.get('uid')!r}, title {d.get('title')!r}")
    check(isinstance(d.get("schemaVersion"), int) and d["schemaVersion"] >= 36, f"schemaVersion {d.get('schemaVersion')}")
    check("__inputs" not in json.dumps(d) and "${DS_" not in json.dumps(d),
          "no import-time inputs (${DS_…}): provisioning can load it as is")

    ds_uid = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
    variables = {v["name"]: v for v in d.get("templating", {}).get("list", [])}
    dsvar = variables.get("datasource", {})
    check(dsvar.get("type") == "datasource" and dsvar.get("query") == "prometheus"
          and dsvar.get("current", {}).get("value") == ds_uid,
          f"variable `datasource` (type prometheus) defaults to the provisioned uid {ds_uid!r}")
    for name in ("job", "instance"):
        check(variables.get(name, {}).get("type") == "query", f"variable `{name}` (query)")

    panels = all_panels(d.get("panels", []))
    ids = [p.get("id") for p in panels]
    check(len(ids) == len(set(ids)) and None not in ids, f"{len(panels)} panels, unique ids")
    bad_grid = [p["title"] for p in panels
                if not (0 <= p["gridPos"]["x"] and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 and p["gridPos"]["h"] > 0)]
    check(not bad_grid, "every panel within the 24-column grid" + (f" — outside: {bad_grid}" if bad_grid else ""))

    known = known_names()
    used: set[str] = set()
    queries: list[str] = []

    def reads(exprs: list[str]) -> tuple[set[str], list[str]]:
        names = set().union(*(metric_names(e) for e in exprs)) if exprs else set()
        used.update(known[n] for n in names if n in known)
        return names, sorted(n for n in names if n not in known and n not in PROMETHEUS_SERIES)

    for p in panels:
        if p.get("type") == "row":
            continue
        targets = p.get("targets", [])
        exprs = [t.get("expr", "").strip() for t in targets]
        refs = [t.get("refId") for t in targets]
        dss = [p.get("datasource")] + [t.get("datasource") for t in targets]
        names, unknown = reads(exprs)
        problems = [why for bad, why in [
            (not targets, "no targets"),
            (not all(exprs), "a target without expr"),
            (len(set(refs)) != len(refs), "duplicate refId"),
            (any(ds != DS for ds in dss), "data source other than ${datasource}"),
            (not names, "reads no series"),
            (bool(unknown), f"unknown series {unknown}"),
        ] if bad]
        check(not problems, f"panel {p.get('title')!r}: {len(targets)} quer{'y' if len(targets) == 1 else 'ies'} "
                            f"of {', '.join(sorted(names)) or 'nothing'}" + (f" — {'; '.join(problems)}" if problems else ""))
        queries.extend(exprs)
    for v in variables.values():
        if v.get("type") == "query":
            q = v.get("query")
            q = q.get("query", "") if isinstance(q, dict) else q or ""
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", q.strip())
            names, unknown = reads([m.group(1)] if m else [])
            check(v.get("datasource") == DS and m is not None and bool(names) and not unknown,
                  f"variable `{v['name']}`: {q}, data source ${{datasource}}" + (f" — unknown: {unknown}" if unknown else ""))
            if m:
                queries.append(m.group(1))

    missing = sorted(set(SERIES) - used - set(UNGRAPHED))
    check(not missing, f"every series is graphed ({len(used)} of {len(SERIES)}; ungraphed on purpose: "
                       f"{sorted(UNGRAPHED) or 'none'})" + (f" — not graphed: {missing}" if missing else ""))

    if promql_rules:
        # Every query as a recording rule: `promtool check rules` then parses all of them.
        rules = [{"record": f"dashboard:query_{i}", "expr": substitute(expr)} for i, expr in enumerate(queries)]
        promql_rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}, sort_keys=False))
        print(f"  (wrote {len(rules)} queries to {promql_rules} for promtool)")
    return used


def alert_rules() -> None:
    print(rel(ALERTS))
    known = known_names()
    doc = yaml.safe_load(ALERTS.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            names = metric_names(str(rule["expr"]))
            unknown = sorted(n for n in names if n not in known and n not in PROMETHEUS_SERIES)
            check(bool(names) and not unknown, f"{name} reads {', '.join(sorted(names))}"
                  + (f" — unknown: {unknown}" if unknown else ""))


def exposition(source: str) -> None:
    print(f"exposition {source}")
    if re.match(r"https?://", source):
        with urllib.request.urlopen(source, timeout=10) as r:
            text = r.read().decode()
    else:
        text = Path(source).read_text()
    families = {}
    for line in text.splitlines():
        m = re.match(r"# TYPE (\S+) (\S+)", line)
        if m:
            families[m.group(1)] = m.group(2)
    samples = {re.split(r"[{ ]", ln, 1)[0] for ln in text.splitlines() if ln and not ln.startswith("#")}
    for name, kind in SERIES.items():
        want = [name + s for s in HISTOGRAM_SUFFIXES] if kind == "histogram" else [name]
        check(families.get(name) == kind and all(w in samples for w in want),
              f"{name}: {kind} with samples (exposed as {families.get(name, 'nothing')})")
    extra = sorted(f for f in families if f.startswith("chat_") and f not in SERIES)
    check(not extra, "every chat_* family exposed is known here (graphed or listed in UNGRAPHED)"
          + (f" — new: {extra}" if extra else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--promql-rules", type=Path, help="write the dashboard's queries as recording rules here")
    ap.add_argument("--exposition", help="a /metrics URL or a file with its text")
    args = ap.parse_args()
    parts = [lambda: dashboard(args.promql_rules), alert_rules]
    if args.exposition:
        parts.append(lambda: exposition(args.exposition))
    for part in parts:
        try:
            part()
        except Exception as e:  # a missing key or an unreadable file is a failed check
            check(False, f"{type(e).__name__}: {e}")
    return summary("dashboard")


if __name__ == "__main__":
    sys.exit(main())
