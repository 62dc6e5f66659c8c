#!/usr/bin/env bash
# Proof of the deploy files on a machine without a Docker engine (called by .ci/run).
#
#   bash deploy/ci-check.sh
#
# Installs what it lacks (Debian packages; a Python virtualenv with pinned tools from
# deploy/ci/requirements.txt, cached under ~/.cache), then checks:
#   1. Dockerfile            hadolint; the image's HEALTHCHECK command run for real with
#                            Debian's busybox-static (the binary the image copies) against a gateway
#   2. docker-compose.yml    JSON schema (deploy/schemas/compose-spec.json, the Compose spec),
#                            Debian's docker-compose v1 `config -q`, with and without the
#                            `monitoring` profile (v1 knows profiles since 1.28)
#   3. nginx                 `nginx -t` on the shipped config as docker-compose mounts it
#                            (`gateway` resolvable in a private mount namespace), and on the
#                            loopback config cluster.sh generates
#   4. Kubernetes            kubernetes-validate --strict (OpenAPI schemas of 1.29 and 1.37) on
#                            every manifest, `kubectl kustomize` rendered and validated again
#   5. consistency           deploy/ci/policy_check.py (files agree with each other and with
#                            docs/operations.md: timeouts, ports, probes, users, Heroku settings,
#                            METRICS_PORT the same in compose, Kubernetes and Prometheus)
#   6. monitoring            promtool (Debian's `prometheus` package, unpacked, not installed):
#                            check config, check rules, test rules (alerts.test.yml); the Grafana
#                            dashboard (deploy/ci/dashboard_check.py: panels, data source, metric
#                            names) and every dashboard query parsed by promtool
#   7. shell                 bash -n and shellcheck on the deploy scripts
#   8. local cluster         deploy/local/cluster.sh start 3, a message sent through nginx by a
#                            client on each instance reaches the clients on every other instance
#                            (deploy/ci/cross_instance.py), status, stop; the series of a live
#                            /metrics are the ones the dashboard knows; METRICS_PORT moves
#                            /metrics off the public port
#
# Environment: GATEWAY_BIN (default target/debug/chat-gateway, which CI builds before this),
# DEPLOY_CHECK_VENV (virtualenv location). Exit status non-zero if any check failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
root="$(pwd)"

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
passed=0; failed=0; failures=()
step() { echo; echo "== deploy-check: $*"; }
# run_check NAME COMMAND…: runs it and records the outcome (the exit status at the end
# is non-zero if any check failed); never stops the script. Returns the check's own
# status, so that a later step can depend on an earlier one (`if run_check …`).
run_check() {
  local name="$1"; shift
  echo "-- $name"
  local rc=0
  "$@" || rc=$?
  if [ "$rc" -eq 0 ]; then
    passed=$((passed + 1)); echo "   PASS $name"
  else
    failed=$((failed + 1)); failures+=("$name"); echo "   FAIL $name (exit $rc)"
  fi
  return "$rc"
}

tmp="$(mktemp -d /tmp/deploy-check.XXXXXX)"
chmod 755 "$tmp"
cluster_dir="$tmp/cluster"
cleanup() {
  if [ -d "$cluster_dir/pids" ]; then CLUSTER_DIR="$cluster_dir" bash deploy/local/cluster.sh stop >/dev/null 2>&1 || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

# ---------------------------------------------------------------------------------------
step "installing what is missing"
need_apt=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need_apt+=(nginx)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v docker-compose >/dev/null 2>&1 || need_apt+=(docker-compose)
command -v shellcheck >/dev/null 2>&1 || need_apt+=(shellcheck)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3 python3-venv)
apt_updated=0
apt_update() { [ $apt_updated = 1 ] || { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && apt_updated=1; }; }
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]}"
  apt_update
  # docker-compose: only its Python code (no Docker engine, which is a mere recommendation).
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
nginx_bin="$(command -v nginx || echo /usr/sbin/nginx)"

# busybox-static as the image gets it (Debian's package), unpacked here, not installed.
bb_dir="${XDG_CACHE_HOME:-$HOME/.cache}/chat-gateway/busybox-static"
busybox="$bb_dir/root/bin/busybox"
if [ ! -x "$busybox" ]; then
  mkdir -p "$bb_dir"
  ( cd "$bb_dir" && { apt-get download busybox-static >/dev/null 2>&1 || { apt_update && apt-get download busybox-static >/dev/null; }; } &&
    dpkg -x busybox-static_*.deb root ) || echo "could not fetch busybox-static"
fi

# promtool as Debian ships it (in the `prometheus` package), unpacked here: the package's
# Prometheus service is neither installed nor started.
prom_dir="${XDG_CACHE_HOME:-$HOME/.cache}/chat-gateway/prometheus"
promtool="$prom_dir/root/usr/bin/promtool"
if [ ! -x "$promtool" ]; then
  mkdir -p "$prom_dir"
  ( cd "$prom_dir" && { apt-get download prometheus >/dev/null 2>&1 || { apt_update && apt-get download prometheus >/dev/null; }; } &&
    dpkg -x prometheus_*.deb root ) || echo "could not fetch prometheus (promtool)"
fi

venv="${DEPLOY_CHECK_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/chat-gateway/deploy-check-venv}"
req="deploy/ci/requirements.txt"
req_hash="$(sha256sum "$req" | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.req-hash" 2>/dev/null)" != "$req_hash" ]; then
  echo "creating $venv"
  rm -rf "$venv"
  if ! python3 -m venv "$venv" 2>/dev/null; then
    apt_update; $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$req" && echo "$req_hash" > "$venv/.req-hash"
fi
py="$venv/bin/python"
export PATH="$venv/bin:$PATH"
echo "nginx: $("$nginx_bin" -v 2>&1)"
echo "redis: $(redis-server --version)"
echo "docker-compose: $(docker-compose version --short 2>/dev/null)"
echo "promtool: $("$promtool" --version 2>/dev/null | head -1)"
echo "tools: $(hadolint --version), check-jsonschema $("$py" -c 'import importlib.metadata as m; print(m.version("check-jsonschema"))'), kubernetes-validate $("$py" -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))'), $(kubectl version --client 2>/dev/null | head -1)"

# ---------------------------------------------------------------------------------------
step "1. Dockerfile"
run_check "hadolint Dockerfile" hadolint Dockerfile

# ---------------------------------------------------------------------------------------
step "2. docker-compose.yml"
run_check "compose-spec JSON schema" check-jsonschema --schemafile deploy/schemas/compose-spec.json docker-compose.yml
run_check "docker-compose (v1, Debian) config -q" docker-compose -f docker-compose.yml config -q
run_check "docker-compose (v1, Debian) --profile monitoring config -q" docker-compose -f docker-compose.yml --profile monitoring config -q

# ---------------------------------------------------------------------------------------
step "3. nginx -t"
# The shipped config laid out as docker-compose mounts it into /etc/nginx (the volumes of the
# nginx service), checked with the compose service name `gateway` resolving as Docker's DNS
# would: a private /etc/hosts, bind-mounted in a private mount namespace (nothing changes
# outside this one command).
nginx_compose_check() {
  local prefix="$tmp/nginx-compose"
  mkdir -p "$prefix"
  "$py" - "$prefix" <<'EOF' || return 1
import shutil, sys, yaml
prefix = sys.argv[1]
nginx = yaml.safe_load(open("docker-compose.yml"))["services"]["nginx"]
for v in nginx["volumes"]:
    src, dst = v.split(":")[:2]
    assert dst.startswith("/etc/nginx/"), dst
    shutil.copy(src, prefix + "/" + dst[len("/etc/nginx/"):])
    print(f"   {src} -> {dst}")
EOF
  { cat /etc/hosts; echo "127.0.0.1 gateway"; } > "$tmp/hosts"
  local args=(-t -p "$prefix/" -c "$prefix/nginx.conf" -e "$prefix/error.log")
  if unshare -m true 2>/dev/null; then
    # stdout to /dev/null: `access_log /dev/stdout` cannot be opened on every kind of stdout.
    # shellcheck disable=SC2016 # $1, $@ belong to the inner bash
    unshare -m bash -c 'mount --bind "$1" /etc/hosts && shift && exec "$@"' _ "$tmp/hosts" "$nginx_bin" "${args[@]}" > /dev/null
  else
    echo "   (no private mount namespace here: checking with gateway replaced by 127.0.0.1)"
    sed -i 's/server gateway:/server 127.0.0.1:/' "$prefix/upstream.conf"
    "$nginx_bin" "${args[@]}" > /dev/null
  fi
}
run_check "nginx -t: deploy/nginx as mounted by docker-compose" nginx_compose_check
# The loopback variant (generated upstream.conf/listen.conf) is checked by cluster.sh start below.

# ---------------------------------------------------------------------------------------
step "4. Kubernetes manifests"
k8s_files=(deploy/kubernetes/*.yaml)
k8s_objects=()
for f in "${k8s_files[@]}"; do [ "$(basename "$f")" = kustomization.yaml ] || k8s_objects+=("$f"); done
for v in 1.29.0 1.37.0; do
  run_check "kubernetes-validate --strict (Kubernetes $v)" kubernetes-validate --strict --quiet -k "$v" "${k8s_objects[@]}"
done
kustomize_check() {
  kubectl kustomize deploy/kubernetes > "$tmp/rendered.yaml" || return 1
  echo "   rendered: $(grep -c '^kind:' "$tmp/rendered.yaml") objects ($(grep '^kind:' "$tmp/rendered.yaml" | cut -d' ' -f2 | tr '\n' ' '))"
  kubernetes-validate --strict --quiet "$tmp/rendered.yaml"
}
run_check "kubectl kustomize deploy/kubernetes, rendered output validated" kustomize_check

# ---------------------------------------------------------------------------------------
step "5. consistency of the deploy files"
run_check "policy_check.py" "$py" deploy/ci/policy_check.py

# ---------------------------------------------------------------------------------------
step "6. monitoring: Prometheus config and alert rules, Grafana dashboard"
if [ -x "$promtool" ]; then
  # rule_files are resolved relative to the config file: this checks alerts.yml too.
  run_check "promtool check config deploy/prometheus/prometheus.yml" "$promtool" check config deploy/prometheus/prometheus.yml
  run_check "promtool check rules deploy/prometheus/alerts.yml" "$promtool" check rules deploy/prometheus/alerts.yml
  run_check "promtool test rules deploy/prometheus/alerts.test.yml" "$promtool" test rules deploy/prometheus/alerts.test.yml
else
  echo "promtool not available"
  failed=$((failed + 1)); failures+=("promtool present")
fi
# The dashboard's own checks, and every query it sends (Grafana's variables substituted)
# written as recording rules, so that promtool's PromQL parser reads each one.
dashboard_check() {
  "$py" deploy/ci/dashboard_check.py --promql-rules "$tmp/dashboard-queries.yml" || return 1
  [ -x "$promtool" ] || { echo "   promtool not available"; return 1; }
  "$promtool" check rules "$tmp/dashboard-queries.yml"
}
run_check "dashboard_check.py, dashboard queries parsed by promtool" dashboard_check

# ---------------------------------------------------------------------------------------
step "7. shell scripts"
shell_files=(deploy/ci-check.sh deploy/local/cluster.sh)
# shellcheck disable=SC2016 # $f belongs to the inner bash
run_check "bash -n" bash -c 'for f; do bash -n "$f" || exit 1; done' _ "${shell_files[@]}"
run_check "shellcheck" shellcheck "${shell_files[@]}"

# ---------------------------------------------------------------------------------------
step "8. local cluster: 3 gateways behind nginx, a message crosses instances"
gateway_bin="${GATEWAY_BIN:-target/debug/chat-gateway}"
case "$gateway_bin" in /*) ;; *) gateway_bin="$root/$gateway_bin" ;; esac
cluster() { CLUSTER_DIR="$cluster_dir" GATEWAY_BIN="$gateway_bin" NGINX_PORT=auto \
  SHUTDOWN_DRAIN_SECS=1 SHUTDOWN_GRACE_SECS=5 bash deploy/local/cluster.sh "$@"; }
if [ ! -x "$gateway_bin" ]; then
  echo "gateway binary $gateway_bin not found: cargo build -p chat-gateway, or set GATEWAY_BIN"
  failed=$((failed + 1)); failures+=("gateway binary present")
elif run_check "cluster.sh start 3" cluster start 3; then
  # shellcheck source=/dev/null
  . "$cluster_dir/cluster.env"
  run_check "cluster.sh status (all running and ready)" cluster status
  run_check "cross-instance message through nginx" "$py" deploy/ci/cross_instance.py "$CLUSTER_URL" --instances 3
  # The image's health checks, run for real with the busybox the image ships.
  healthcheck_check() {
    [ -x "$busybox" ] || { echo "   busybox-static not available"; return 1; }
    local port="${GATEWAY_URLS%% *}"; port="${port##*:}"
    "$py" - "$busybox" "$port" <<'EOF'
import json, re, subprocess, sys, yaml
busybox, port = sys.argv[1], sys.argv[2]
def run(argv, env):
    argv = [a.replace("/busybox/busybox", busybox) for a in argv]
    return subprocess.run(argv, env=env, capture_output=True, timeout=10).returncode
text = open("Dockerfile").read().replace("\\\n", " ")
docker = json.loads(re.search(r"^HEALTHCHECK .*?CMD (\[.*\])\s*$", text, re.M).group(1))
compose = yaml.safe_load(open("docker-compose.yml"))["services"]["gateway"]["healthcheck"]["test"][1:]
ok = True
for name, argv, env, want in [
    ("Dockerfile HEALTHCHECK (/healthz), gateway up", docker, {"PORT": port}, 0),
    ("Dockerfile HEALTHCHECK, nothing listening", docker, {"PORT": "1"}, 1),
    ("compose healthcheck (/readyz), gateway ready", [a.replace(":4444/", f":{port}/") for a in compose], {}, 0),
]:
    rc = run(argv, env)
    good = (rc == 0) == (want == 0)
    ok &= good
    print(f"   {'ok  ' if good else 'FAIL'} {name}: exit {rc}")
sys.exit(0 if ok else 1)
EOF
  }
  run_check "image health-check commands (busybox-static)" healthcheck_check
  # cluster.sh leaves METRICS_PORT unset: /metrics is on each gateway's own port. After the
  # traffic above, every series the dashboard reads must be there, and no unknown chat_* one.
  run_check "live /metrics has exactly the series the dashboard knows" \
    "$py" deploy/ci/dashboard_check.py --exposition "${GATEWAY_URLS%% *}/metrics"
  # What docker-compose.yml and Kubernetes rely on: with METRICS_PORT, /metrics is served on
  # that port and not on PORT (the one nginx, the Service and the Ingress forward).
  metrics_port_check() {
    "$py" - "$gateway_bin" <<'EOF'
import os, socket, subprocess, sys, time, urllib.error, urllib.request
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]
port, mport = free_port(), free_port()
env = {"PATH": os.environ.get("PATH", ""), "APP_ENV": "production", "HOST": "127.0.0.1",
       "PORT": str(port), "METRICS_PORT": str(mport), "RUST_LOG": "warn"}
def status(p, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{p}{path}", timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
gw = subprocess.Popen([sys.argv[1]], env=env)
try:
    deadline = time.monotonic() + 30
    while True:
        try:
            ready = status(port, "/readyz")[0]
            break
        except OSError:
            if gw.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    (m_code, body), (p_code, _) = status(mport, "/metrics"), status(port, "/metrics")
    ok = ready == 200 and m_code == 200 and "chat_build_info" in body and p_code == 404
    print(f"   /readyz on PORT {ready}; /metrics on METRICS_PORT {m_code}, on PORT {p_code} (want 200, 200, 404)")
    sys.exit(0 if ok else 1)
finally:
    gw.terminate()
    gw.wait(timeout=30)
EOF
  }
  run_check "METRICS_PORT: /metrics on its own port only" metrics_port_check
  run_check "cluster.sh stop" cluster stop
  stopped_check() { local rc=0; cluster status > /dev/null || rc=$?; [ "$rc" = 3 ]; }
  run_check "cluster.sh status after stop: not running" stopped_check
else
  for f in "$cluster_dir"/logs/*.log; do [ -f "$f" ] && { echo "----- $f"; tail -n 30 "$f"; }; done
fi

# ---------------------------------------------------------------------------------------
echo
if [ "$failed" -gt 0 ]; then
  echo "deploy-check: FAILED:"; printf "  - %s\n" "${failures[@]}"
fi
echo "deploy: $passed passed, $failed failed"
if [ "$failed" -ne 0 ] || [ "$passed" -eq 0 ]; then
  exit 1
fi
