#!/usr/bin/env python3
"""Checks what the schemas cannot: that the deploy files agree with each other and with
the gateway's documented behaviour (docs/operations.md, issue 5), and that the metrics port
is the same everywhere and reached by Prometheus only (issue 14).

    python3 deploy/ci/policy_check.py            # from the repository root

Prints one line per check and exits 1 if any failed. Needs PyYAML.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import yaml

from checks import check, summary

ROOT = Path(__file__).resolve().parents[2]
BINARY = "chat-gateway"


def documented_default(var: str) -> int:
    """A variable's default from the configuration table of docs/operations.md."""
    m = re.search(rf"^\| `{var}` \| `(\d+)` \|", (ROOT / "docs/operations.md").read_text(), re.M)
    if not m:
        raise SystemExit(f"policy: no default for {var} in docs/operations.md")
    return int(m.group(1))


# The gateway's defaults that the deploy files must respect.
PING_INTERVAL_SECS = documented_default("PING_INTERVAL_SECS")
SHUTDOWN_GRACE_SECS = documented_default("SHUTDOWN_GRACE_SECS")
GATEWAY_PORT = documented_default("PORT")



def secs(value) -> float:
    """Compose durations: 30s, 1m30s, 500ms, or a bare number of seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(value)):
        total += float(num) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}[unit]
    return total


def load_yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def dockerfile() -> None:
    print("Dockerfile")
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.replace("\\\n", " ").splitlines() if ln.strip() and not ln.strip().startswith("#")]
    froms = [ln for ln in lines if ln.upper().startswith("FROM ")]
    check(len(froms) >= 2, f"multi-stage ({len(froms)} FROM lines)")
    cook = next((i for i, ln in enumerate(lines) if "cargo chef cook" in ln), None)
    copy_all = [i for i, ln in enumerate(lines) if re.match(r"COPY\s+\.\s+\.", ln)]
    build = next((i for i, ln in enumerate(lines) if re.search(r"cargo build --release", ln)), None)
    check(cook is not None and build is not None and any(cook < c < build for c in copy_all),
          "dependencies cooked (cargo chef cook) before the sources are copied and built")
    runtime = text[text.rfind("\nFROM "):]
    user = re.findall(r"^USER\s+(\S+)", runtime, re.M)
    check(bool(user) and user[-1].split(":")[0] not in ("0", "root"), f"runtime runs as non-root USER {user[-1] if user else '?'}")
    check(re.search(r"^HEALTHCHECK .*?/healthz", runtime, re.M | re.S) is not None, "HEALTHCHECK on /healthz")
    check(re.search(r"^STOPSIGNAL\s+SIGTERM\s*$", runtime, re.M) is not None, "STOPSIGNAL SIGTERM")
    env = " ".join(re.findall(r"^ENV\s+(.*?)(?<!\\)$", runtime.replace("\\\n", " "), re.M))
    check("APP_ENV=production" in env and "LOG_FORMAT=json" in env, "ENV APP_ENV=production LOG_FORMAT=json")
    check(re.search(rf"^ENTRYPOINT .*{BINARY}", runtime, re.M) is not None, f"ENTRYPOINT runs {BINARY}")
    ignore = {ln.strip().rstrip("/") for ln in (ROOT / ".dockerignore").read_text().splitlines()}
    for entry in ("target", "node_modules", "artifacts", "e2e", ".git"):
        check(entry in ignore, f".dockerignore excludes {entry}/")
    check(not ({"crates", "web", "Cargo.toml", "Cargo.lock"} & ignore), ".dockerignore keeps crates/, web/, Cargo.toml, Cargo.lock")


def compose() -> None:
    print("docker-compose.yml")
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    svc = doc["services"]
    redis, gw, ngx = svc.get("redis", {}), svc.get("gateway", {}), svc.get("nginx", {})
    test = " ".join(map(str, redis.get("healthcheck", {}).get("test", [])))
    check("redis-cli" in test and "ping" in test, "redis healthcheck: redis-cli ping")
    cmd = redis.get("command", [])
    cmd = shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]
    check("--appendonly" in cmd and cmd[cmd.index("--appendonly") + 1] == "yes", "redis --appendonly yes")
    vols = [str(v) for v in redis.get("volumes", [])]
    named = set(doc.get("volumes", {}) or {})
    check(any(v.split(":")[0] in named and v.split(":")[1] == "/data" for v in vols), "redis /data on a named volume")
    check("ports" not in gw, "gateway publishes no host port (so --scale works)")
    check(gw.get("deploy", {}).get("replicas") == 3, "gateway deploy.replicas: 3")
    check("container_name" not in gw, "gateway has no container_name (so --scale works)")
    genv = gw.get("environment", {})
    genv = dict(e.split("=", 1) for e in genv) if isinstance(genv, list) else genv
    check("INSTANCE_ID" not in genv, "gateway INSTANCE_ID unset: each replica uses its hostname")
    check(str(genv.get("REDIS_URL", "")).startswith("redis://redis:"), "gateway REDIS_URL points at the redis service")
    check(gw.get("depends_on", {}).get("redis", {}).get("condition") == "service_healthy", "gateway waits for a healthy redis")
    check(secs(gw.get("stop_grace_period", 10)) > SHUTDOWN_GRACE_SECS,
          f"gateway stop_grace_period {gw.get('stop_grace_period')} > SHUTDOWN_GRACE_SECS {SHUTDOWN_GRACE_SECS}s")
    check("build" in gw, "gateway built from the Dockerfile")
    check(ngx.get("depends_on", {}).get("gateway", {}).get("condition") == "service_healthy", "nginx waits for healthy gateways")
    ports = [str(p) for p in ngx.get("ports", [])]
    check(any(re.match(r"^(\$\{CHAT_PORT:-8080\}|8080):80$", p) for p in ports), f"nginx on host port 8080 ({ports})")
    mounts = {}
    for v in ngx.get("volumes", []):
        src, dst = str(v).split(":")[:2]
        mounts[dst] = src
        check((ROOT / src).is_file(), f"nginx mount {src} exists")
    check(mounts.get("/etc/nginx/nginx.conf") == "./deploy/nginx/nginx.conf", "nginx uses deploy/nginx/nginx.conf as is")
    upstream = (ROOT / mounts.get("/etc/nginx/upstream.conf", "missing")).read_text() if "/etc/nginx/upstream.conf" in mounts else ""
    check(re.search(r"server\s+gateway:4444\b", upstream) is not None, "nginx upstream is the gateway service (gateway:4444)")


def nginx() -> None:
    print("deploy/nginx/nginx.conf")
    text = (ROOT / "deploy/nginx/nginx.conf").read_text()
    m = re.search(r"proxy_read_timeout\s+(\d+)s?;", text)
    check(m is not None and int(m.group(1)) > 2 * PING_INTERVAL_SECS,
          f"proxy_read_timeout {m.group(1) if m else '?'}s > 2 × PING_INTERVAL_SECS")
    m = re.search(r"proxy_send_timeout\s+(\d+)s?;", text)
    check(m is not None and int(m.group(1)) > PING_INTERVAL_SECS, "proxy_send_timeout > PING_INTERVAL_SECS")
    check("proxy_set_header Upgrade $http_upgrade;" in text and "proxy_set_header Connection $connection_upgrade;" in text,
          "WebSocket upgrade headers passed")
    check("include upstream.conf;" in text and "include listen.conf;" in text and "proxy_pass http://chat;" in text,
          "upstream.conf/listen.conf includes and `upstream chat` kept (the e2e test writes them)")


def heroku() -> None:
    print("Heroku (Procfile, app.json, RustConfig)")
    procs = dict(ln.split(":", 1) for ln in (ROOT / "Procfile").read_text().splitlines() if ":" in ln)
    check(procs.get("web", "").strip() == f"./target/release/{BINARY}", f"Procfile web: ./target/release/{BINARY}")
    cargo = (ROOT / "crates/gateway/Cargo.toml").read_text()
    check(f'name = "{BINARY}"' in cargo, f"the gateway crate builds a binary called {BINARY}")
    rc = (ROOT / "RustConfig").read_text()
    m = re.search(r'^RUST_CARGO_BUILD_FLAGS="([^"]*)"', rc, re.M)
    flags = m.group(1).split() if m else []
    check("--release" in flags, "RustConfig builds --release (the Procfile runs target/release)")
    check("-p" in flags and flags[flags.index("-p") + 1] == BINARY, f"RustConfig builds -p {BINARY}")
    app = json.loads((ROOT / "app.json").read_text())
    check(any("rust" in b.get("url", "") for b in app.get("buildpacks", [])), "app.json: a Rust buildpack")
    plans = [a["plan"] if isinstance(a, dict) else a for a in app.get("addons", [])]
    check(any(p.startswith("heroku-redis") for p in plans), f"app.json: heroku-redis (Key-Value Store) add-on {plans}")
    env = app.get("env", {})
    val = lambda k: env.get(k, {}).get("value") if isinstance(env.get(k), dict) else env.get(k)  # noqa: E731
    check(val("REDIS_TLS_INSECURE") == "true" and "Heroku" in env.get("REDIS_TLS_INSECURE", {}).get("description", ""),
          "app.json: REDIS_TLS_INSECURE=true, described as Heroku-only")
    check(val("APP_ENV") == "production" and val("LOG_FORMAT") == "json", "app.json: APP_ENV=production, LOG_FORMAT=json")
    check("PORT" not in env and "INSTANCE_ID" not in env, "app.json leaves PORT (router) and INSTANCE_ID (DYNO) to Heroku")
    # Heroku: SIGKILL 30 s after SIGTERM; router cuts connections idle for 55 s.
    check(SHUTDOWN_GRACE_SECS < 30, f"documented SHUTDOWN_GRACE_SECS {SHUTDOWN_GRACE_SECS}s < Heroku's 30 s SIGTERM grace")
    check(PING_INTERVAL_SECS < 55, f"documented PING_INTERVAL_SECS {PING_INTERVAL_SECS}s < Heroku router's 55 s idle cut-off")


def kubernetes() -> None:
    print("deploy/kubernetes")
    kdir = ROOT / "deploy/kubernetes"
    objs: dict[str, dict] = {}
    for f in sorted(kdir.glob("*.yaml")):
        for d in load_yaml_docs(f):
            objs[d["kind"]] = d
    kust = objs.get("Kustomization", {})
    for res in kust.get("resources", []):
        check((kdir / res).is_file(), f"kustomization resource {res} exists")
    dep = objs["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    sel = dep["spec"]["selector"]["matchLabels"]
    check(all(labels.get(k) == v for k, v in sel.items()), "Deployment selector matches its pod labels")
    c = pod["containers"][0]
    env = {e["name"]: e for e in c.get("env", [])}
    grace = int(env.get("SHUTDOWN_GRACE_SECS", {}).get("value", SHUTDOWN_GRACE_SECS))
    pre = c.get("lifecycle", {}).get("preStop", {})
    pre_secs = 0
    if "exec" in pre and "sleep" in pre["exec"]["command"]:
        pre_secs = int(pre["exec"]["command"][-1])
    elif "sleep" in pre:
        pre_secs = int(pre["sleep"]["seconds"])
    tgps = pod.get("terminationGracePeriodSeconds", 30)
    check(tgps > grace + pre_secs, f"terminationGracePeriodSeconds {tgps} > preStop {pre_secs}s + SHUTDOWN_GRACE_SECS {grace}s")
    check(c["readinessProbe"]["httpGet"]["path"] == "/readyz", "readiness probe on /readyz")
    check(c["livenessProbe"]["httpGet"]["path"] == "/healthz", "liveness probe on /healthz")
    check(env.get("INSTANCE_ID", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name",
          "INSTANCE_ID from the pod name (downward API)")
    ref = env.get("REDIS_URL", {}).get("valueFrom", {}).get("secretKeyRef", {})
    secret = objs.get("Secret", {})
    check(bool(ref) and ref.get("name") == secret.get("metadata", {}).get("name") and ref.get("key") in secret.get("stringData", {}),
          f"REDIS_URL from Secret {ref.get('name')}/{ref.get('key')} (shape in secret.example.yaml)")
    port = int(env.get("PORT", {}).get("value", GATEWAY_PORT))
    check(any(p["containerPort"] == port for p in c.get("ports", [])), f"containerPort matches PORT {port}")
    sc = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
    docker_user = re.findall(r"^USER\s+(\d+)", (ROOT / "Dockerfile").read_text(), re.M)
    check(sc.get("runAsNonRoot") is True and str(sc.get("runAsUser")) == (docker_user[-1] if docker_user else ""),
          f"runAsNonRoot with the image's user {sc.get('runAsUser')}")
    check(sc.get("allowPrivilegeEscalation") is False and sc.get("readOnlyRootFilesystem") is True, "no privilege escalation, read-only root")
    res = c.get("resources", {})
    check("requests" in res and "cpu" in res["requests"], "CPU request set (the HPA's utilisation needs it)")
    svc = objs["Service"]
    check(all(labels.get(k) == v for k, v in svc["spec"]["selector"].items()), "Service selects the gateway pods")
    check(any(p.get("targetPort") in ("http", port) for p in svc["spec"]["ports"]), "Service targets the gateway port")
    hpa = objs["HorizontalPodAutoscaler"]
    tgt = hpa["spec"]["scaleTargetRef"]
    check(tgt["kind"] == "Deployment" and tgt["name"] == dep["metadata"]["name"], "HPA scales the Deployment")
    check(hpa["spec"].get("minReplicas", 1) >= 2, f"HPA minReplicas {hpa['spec'].get('minReplicas')} >= 2")
    check("replicas" not in dep["spec"], "Deployment leaves replicas to the HPA")
    pdb = objs["PodDisruptionBudget"]
    check(all(labels.get(k) == v for k, v in pdb["spec"]["selector"]["matchLabels"].items()), "PDB selects the gateway pods")


def monitoring() -> None:
    """METRICS_PORT: one value everywhere (compose, Kubernetes, Prometheus), never behind
    nginx, a Service or an Ingress; the monitoring profile wired as its files expect."""
    print("monitoring (METRICS_PORT, Prometheus, Grafana)")
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    svc = doc["services"]
    gw = svc["gateway"]
    genv = gw.get("environment", {})
    genv = dict(e.split("=", 1) for e in genv) if isinstance(genv, list) else genv
    port = str(genv.get("METRICS_PORT", ""))
    check(port.isdigit() and int(port) != GATEWAY_PORT and port != str(genv.get("PORT")),
          f"compose gateway METRICS_PORT {port or '(unset)'}, not its PORT")
    check(port in [str(e) for e in gw.get("expose", [])], f"compose gateway exposes {port} (to the compose network only)")
    check("ports" not in gw, "compose gateway publishes no port, the metrics port included")

    # Prometheus: the gateway replicas themselves, on METRICS_PORT.
    pdir = ROOT / "deploy/prometheus"
    prom = yaml.safe_load((pdir / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom.get("scrape_configs", [])}
    job = jobs.get("chat-gateway", {})
    dns = job.get("dns_sd_configs", [])
    check(len(dns) == 1 and dns[0].get("names") == ["gateway"] and dns[0].get("type") == "A",
          "prometheus job chat-gateway: dns_sd_configs names [gateway], type A (one record per replica)")
    check(bool(dns) and str(dns[0].get("port")) == port, f"prometheus scrapes port {dns[0].get('port') if dns else '?'} = METRICS_PORT {port}")
    check(job.get("metrics_path", "/metrics") == "/metrics", "prometheus metrics_path /metrics")
    check(prom.get("global", {}).get("scrape_interval") == "15s", "prometheus scrape_interval 15s")
    check(all((pdir / f).is_file() for f in prom.get("rule_files", [])) and "alerts.yml" in prom.get("rule_files", []),
          f"prometheus rule_files {prom.get('rule_files')} exist beside prometheus.yml")
    # Nothing scraped through the balancer: no target is nginx or a public port.
    public = {"80", "8080", str(GATEWAY_PORT), str(genv.get("PORT", GATEWAY_PORT))}
    targets = [str(t) for j in jobs.values() for sc in j.get("static_configs", []) for t in sc.get("targets", [])]
    targets += [f"{n}:{d.get('port')}" for j in jobs.values() for d in j.get("dns_sd_configs", []) for n in d.get("names", [])]
    via_nginx = [t for t in targets if t.split(":")[0] == "nginx" or t.rsplit(":", 1)[-1] in public]
    check(not via_nginx, f"no prometheus target goes through nginx or a public port ({targets})")
    upstream = (ROOT / "deploy/nginx/upstream.conf").read_text()
    check(f":{port}" not in upstream, f"nginx upstream does not reach the metrics port {port}")

    # The monitoring profile.
    pr, gf = svc.get("prometheus", {}), svc.get("grafana", {})
    for name, s_ in (("prometheus", pr), ("grafana", gf)):
        image = str(s_.get("image", ""))
        check(s_.get("profiles") == ["monitoring"], f"{name}: only in profile monitoring")
        check(":" in image and not image.endswith(":latest"), f"{name}: image pinned ({image})")
        ports = [str(p) for p in s_.get("ports", [])]
        check(bool(ports) and all(p.startswith("127.0.0.1:") for p in ports), f"{name}: published on 127.0.0.1 only ({ports})")

    def mounts(s_: dict) -> dict[str, tuple[str, bool]]:
        out = {}
        for v in s_.get("volumes", []):
            parts = str(v).split(":")
            out[parts[1]] = (parts[0], len(parts) > 2 and "ro" in parts[2].split(","))
        return out

    pm = mounts(pr)
    check(pm.get("/etc/prometheus") == ("./deploy/prometheus", True), "prometheus: deploy/prometheus at /etc/prometheus, read-only")
    check("--config.file=/etc/prometheus/prometheus.yml" in pr.get("command", []), "prometheus: --config.file=/etc/prometheus/prometheus.yml")
    gm = mounts(gf)
    gdir = ROOT / "deploy/grafana"
    check(gm.get("/etc/grafana/provisioning") == ("./deploy/grafana/provisioning", True),
          "grafana: deploy/grafana/provisioning at /etc/grafana/provisioning, read-only")
    dash_dst = next((dst for dst, (src, _) in gm.items() if src == "./deploy/grafana/dashboards"), None)
    check(dash_dst is not None and gm[dash_dst][1], f"grafana: deploy/grafana/dashboards mounted read-only ({dash_dst})")
    providers = yaml.safe_load((gdir / "provisioning/dashboards/dashboards.yml").read_text())["providers"]
    check(any(p_.get("type") == "file" and p_.get("options", {}).get("path") == dash_dst for p_ in providers),
          f"grafana dashboard provider reads {dash_dst}")
    ds = yaml.safe_load((gdir / "provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    m = re.match(r"http://([^:/]+):(\d+)", ds.get("url", ""))
    check(m is not None and m.group(1) == "prometheus" and m.group(1) in svc
          and any(str(p).endswith(":" + m.group(2)) for p in pr.get("ports", [])),
          f"grafana data source {ds.get('url')} is the prometheus service")
    home = str(gf.get("environment", {}).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH", ""))
    check(dash_dst is not None and home.startswith(dash_dst + "/") and (gdir / "dashboards" / Path(home).name).is_file(),
          f"grafana home dashboard {home} exists")

    # Kubernetes: env, containerPort and annotations agree; no Service or Ingress carries it.
    kdir = ROOT / "deploy/kubernetes"
    objs = {d["kind"]: d for f in sorted(kdir.glob("*.yaml")) for d in load_yaml_docs(f)}
    tmpl = objs["Deployment"]["spec"]["template"]
    c = tmpl["spec"]["containers"][0]
    kenv = {e["name"]: e.get("value") for e in c.get("env", [])}
    kports = {p_.get("name"): p_ for p_ in c.get("ports", [])}
    ann = tmpl["metadata"].get("annotations", {})
    check(kenv.get("METRICS_PORT") == port, f"Kubernetes METRICS_PORT {kenv.get('METRICS_PORT')} = compose's {port}")
    check(str(kports.get("metrics", {}).get("containerPort")) == port, f"Kubernetes containerPort `metrics` {port}")
    check(ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port") == port
          and ann.get("prometheus.io/path") == "/metrics",
          f"Kubernetes pod annotations prometheus.io/scrape true, port {ann.get('prometheus.io/port')}, path {ann.get('prometheus.io/path')}")
    sports = objs["Service"]["spec"]["ports"]
    check(all(str(p_.get("targetPort")) not in ("metrics", port) and str(p_.get("port")) != port for p_ in sports),
          "the Service (what the Ingress and clients use) does not forward the metrics port")
    ing = json.dumps(objs.get("Ingress", {}))
    check('"metrics"' not in ing and port not in ing, "the example Ingress does not route the metrics port")


def main() -> int:
    for part in (dockerfile, compose, nginx, heroku, kubernetes, monitoring):
        try:
            part()
        except Exception as e:  # a missing key is a failed check, not a crash
            check(False, f"{part.__name__}: {type(e).__name__}: {e}")
    return summary("policy")


if __name__ == "__main__":
    sys.exit(main())
