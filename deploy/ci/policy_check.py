#!/usr/bin/env python3
"""Checks what the schemas cannot: that the deploy files agree with each other and with
the gateway's documented behaviour (docs/operations.md, issue 5).

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

failures: list[str] = []
passes = 0


def check(cond: bool, what: str) -> None:
    global passes
    if cond:
        passes += 1
        print(f"  ok   {what}")
    else:
        failures.append(what)
        print(f"  FAIL {what}")


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


def main() -> int:
    for part in (dockerfile, compose, nginx, heroku, kubernetes):
        try:
            part()
        except Exception as e:  # a missing key is a failed check, not a crash
            check(False, f"{part.__name__}: {type(e).__name__}: {e}")
    if failures:
        print(f"policy: {len(failures)} of {passes + len(failures)} checks FAILED")
    else:
        print(f"policy: all {passes} checks ok")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
