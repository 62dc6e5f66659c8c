#!/usr/bin/env bash
# A local cluster without Docker: one redis-server, N chat-gateway instances and nginx
# (deploy/nginx/nginx.conf) in front, all on 127.0.0.1, all unprivileged. No root, nothing
# written outside the state directory.
#
#   deploy/local/cluster.sh start [N]   start Redis, N gateways (default 3) and nginx; print the URL
#   deploy/local/cluster.sh status      what runs, on which port, and whether it is ready
#   deploy/local/cluster.sh url         print the chat URL (for scripts)
#   deploy/local/cluster.sh stop        SIGTERM everything (gateways drain), wait, then SIGKILL stragglers
#   deploy/local/cluster.sh clean       stop, then delete the state directory (logs, Redis data)
#
# Environment (all optional):
#   CLUSTER_DIR         state directory (default: <repo>/.local-cluster). Use one per cluster
#                       to run several side by side (tests, benchmarks).
#   GATEWAY_BIN         gateway binary (default: target/release/chat-gateway, else target/debug/…)
#   NGINX_PORT          nginx's port (default 8080 when free, else any free port; `auto` = any free)
#   REDIS_PORT          redis-server's port (default: any free port)
#   CLUSTER_REDIS_URL   use this Redis instead of starting one (e.g. redis://127.0.0.1:6379)
#   INSTANCE_PREFIX     gateway ids are PREFIX-1 … PREFIX-N (default: local)
#   NGINX_BIN, REDIS_SERVER_BIN   the programs (default: from PATH, /usr/sbin/nginx)
#   Any gateway variable (docs/operations.md) is passed through to the gateways, e.g.
#   SHUTDOWN_DRAIN_SECS=1 SHUTDOWN_GRACE_SECS=5 for fast stops, RUST_LOG, LOG_FORMAT.
#   PORT, HOST, REDIS_URL and INSTANCE_ID are set by the script. Two have other defaults
#   here, for the web client: JOIN_REPLAY_LIMIT=50 (a fresh join shows the newest 50
#   messages; older ones are paged over the server API) and API_KEY (the API exists only
#   with a key: a random one is generated per start unless you set your own, ≥ 16 chars).
#
# After `start`, $CLUSTER_DIR/cluster.env holds shell assignments for scripts:
#   CLUSTER_URL, CLUSTER_WS_URL, NGINX_PORT, REDIS_URL, GATEWAY_COUNT, GATEWAY_URLS, GATEWAY_IDS,
#   API_KEY (the server API's key, for `curl -H "Authorization: Bearer $API_KEY" $CLUSTER_URL/api/…`)
# Logs: $CLUSTER_DIR/logs/{redis,gateway-<id>,nginx}.log
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
dir="$(realpath -m "${CLUSTER_DIR:-$root/.local-cluster}")"
piddir="$dir/pids"
logdir="$dir/logs"
envfile="$dir/cluster.env"
marker="$dir/.chat-gateway-cluster"

die() { echo "cluster: $*" >&2; exit 1; }
say() { echo "cluster: $*"; }

find_bin() { # name, fallbacks…
  local name="$1"; shift
  if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return 0; fi
  local f
  for f in "$@"; do [ -x "$f" ] && { echo "$f"; return 0; }; done
  return 1
}

# Is something listening on 127.0.0.1:$1?
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

taken_ports=" "
# A port nothing listens on now (and not handed out earlier in this run).
free_port() {
  local p i
  for i in $(seq 1 50); do
    if command -v python3 >/dev/null 2>&1; then
      p="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
    else
      p=$(( 20000 + RANDOM % 40000 ))
    fi
    case "$taken_ports" in *" $p "*) continue ;; esac
    if ! port_in_use "$p"; then taken_ports="$taken_ports$p "; echo "$p"; return 0; fi
  done
  die "no free port found"
}

# HTTP status of GET $1 (000 when nothing answers).
http_status() {
  if command -v curl >/dev/null 2>&1; then
    curl -s -o /dev/null -m 2 -w '%{http_code}' "$1" 2>/dev/null || true
  else
    local rest="${1#http://}" hostport path line
    hostport="${rest%%/*}"; path="/${rest#*/}"
    line="$( (exec 3<>"/dev/tcp/${hostport%:*}/${hostport##*:}" &&
      printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$path" "$hostport" >&3 &&
      timeout 2 head -n1 <&3) 2>/dev/null || true)"
    local _proto code _rest
    read -r _proto code _rest <<< "$line"
    echo "${code:-000}"
  fi
}

redis_ping() { # port
  local reply
  reply="$( (exec 3<>"/dev/tcp/127.0.0.1/$1" && printf 'PING\r\n' >&3 && timeout 1 head -c 5 <&3) 2>/dev/null || true)"
  [ "$reply" = "+PONG" ]
}

# Is process $1 alive (a zombie waiting to be reaped counts as gone)?
running() {
  kill -0 "$1" 2>/dev/null || return 1
  local stat
  stat="$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null)" || return 0
  [ "${stat%% *}" != Z ]
}

# pid of a component if it still runs the program it was started as.
live_pid() { # name
  local f="$piddir/$1.pid" pid exe
  [ -f "$f" ] || return 1
  read -r pid exe < "$f" || return 1
  [ -n "$pid" ] && running "$pid" || return 1
  # Guard against a recycled pid: the process must still be the same program (a binary
  # rebuilt while running shows as "PATH (deleted)").
  local cur
  cur="$(readlink "/proc/$pid/exe" 2>/dev/null || echo "$exe")"
  [ "${cur% (deleted)}" = "$exe" ] || return 1
  echo "$pid"
}

# Starts a detached process (own session: a closed terminal or a Ctrl-C elsewhere does not
# reach it) with output appended to logs/<name>.log; records "pid exe" in pids/<name>.pid.
launch() { # name, program, args…   (with `env VAR=… program args…` as the command)
  local name="$1" prog="$2"; shift 2
  local log="$logdir/$name.log" pidfile="$piddir/$name.pid"
  printf '\n=== %s %s\n' "$(date -u +%FT%TZ)" "$*" >> "$log"
  rm -f "$pidfile"
  # The process records its own pid (whether or not setsid had to fork), then becomes the
  # command. The pid file holds "pid program-path".
  # shellcheck disable=SC2016 # $$, $1… belong to the inner bash
  setsid bash -c 'echo "$$ $1" > "$2.tmp" && mv "$2.tmp" "$2" && shift 2 && exec "$@"' \
    _ "$(readlink -f "$prog")" "$pidfile" "$@" < /dev/null >> "$log" 2>&1 &
  local i
  for i in $(seq 1 50); do [ -s "$pidfile" ] && return 0; sleep 0.1; done
  die "$name did not start (see $log)"
}

wait_until() { # component-name, timeout-seconds, command…
  local name="$1" secs="$2"; shift 2
  local deadline=$(( $(date +%s) + secs )) why=""
  until "$@"; do
    if ! live_pid "$name" >/dev/null; then why="exited during start-up"; break; fi
    if [ "$(date +%s)" -ge "$deadline" ]; then why="not ready after ${secs}s"; break; fi
    sleep 0.1 # polling a starting process, not synchronising a test
  done
  [ -z "$why" ] && return 0
  echo "cluster: $name $why; last lines of $logdir/$name.log:" >&2
  tail -n 20 "$logdir/$name.log" >&2 || true
  return 1
}

components() { # in stop order: nginx, gateways, redis
  [ -d "$piddir" ] || return 0
  [ -f "$piddir/nginx.pid" ] && echo nginx
  local f
  for f in "$piddir"/gateway-*.pid; do [ -f "$f" ] && basename "$f" .pid; done
  [ -f "$piddir/redis.pid" ] && echo redis
  return 0
}

cmd_stop() {
  local names=() name pid
  mapfile -t names < <(components)
  if [ ${#names[@]} -eq 0 ]; then say "nothing to stop in $dir"; return 0; fi
  local grace=25
  # shellcheck source=/dev/null
  [ -f "$envfile" ] && grace="$(. "$envfile"; echo "${GATEWAY_GRACE_SECS:-25}")"
  # nginx first (no new clients), then every gateway at once (they drain in parallel), then Redis.
  stop_group() { # timeout, names…
    local secs="$1"; shift
    local pids=() n p
    for n in "$@"; do
      if p="$(live_pid "$n")"; then kill -TERM "$p" 2>/dev/null || true; pids+=("$n:$p"); fi
    done
    local deadline=$(( $(date +%s) + secs ))
    for n in "${pids[@]}"; do
      p="${n#*:}"
      while running "$p" && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.1; done
      if running "$p"; then
        echo "cluster: ${n%%:*} (pid $p) still running after ${secs}s: SIGKILL" >&2
        kill -KILL "$p" 2>/dev/null || true
      fi
    done
    for n in "$@"; do rm -f "$piddir/$n.pid"; done
  }
  local gws=()
  for name in "${names[@]}"; do case "$name" in gateway-*) gws+=("$name") ;; esac; done
  [[ " ${names[*]} " == *" nginx "* ]] && stop_group 10 nginx
  [ ${#gws[@]} -gt 0 ] && stop_group $(( grace + 5 )) "${gws[@]}"
  [[ " ${names[*]} " == *" redis "* ]] && stop_group 10 redis
  say "stopped (${names[*]}); logs kept in $logdir"
}

cmd_start() {
  local n="${1:-3}"
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "N must be a positive number, got '$n'"
  local name
  for name in $(components); do
    if live_pid "$name" >/dev/null; then die "already running ($name); run '$0 stop' first (CLUSTER_DIR=$dir)"; fi
  done
  [ ! -e "$dir" ] || [ -f "$marker" ] || [ -z "$(ls -A "$dir")" ] ||
    die "$dir exists and is not a cluster state directory; set CLUSTER_DIR"
  rm -rf "$piddir"
  mkdir -p "$piddir" "$logdir"
  touch "$marker"
  rm -f "$envfile"

  local gw_bin="${GATEWAY_BIN:-}"
  if [ -z "$gw_bin" ]; then
    local tdir="${CARGO_TARGET_DIR:-$root/target}"
    for gw_bin in "$tdir/release/chat-gateway" "$tdir/debug/chat-gateway"; do [ -x "$gw_bin" ] && break; done
  fi
  case "$gw_bin" in /*) ;; *) gw_bin="$root/$gw_bin" ;; esac
  [ -x "$gw_bin" ] || die "gateway binary $gw_bin not found: cargo build --release -p chat-gateway, or set GATEWAY_BIN"
  local nginx_bin redis_bin=""
  nginx_bin="${NGINX_BIN:-$(find_bin nginx /usr/sbin/nginx || true)}"
  [ -n "$nginx_bin" ] || die "nginx not found (Debian: apt-get install nginx)"

  # On failure part-way (any exit before the end of start), take down what was started.
  started=0
  trap 'if [ "$started" = 0 ]; then echo "cluster: start failed; stopping what was started" >&2; cmd_stop >&2 || true; fi' EXIT

  # --- Redis -------------------------------------------------------------------------
  local redis_url redis_port=""
  if [ -n "${CLUSTER_REDIS_URL:-}" ]; then
    redis_url="$CLUSTER_REDIS_URL"
    say "using Redis $redis_url (not started here)"
  else
    redis_bin="${REDIS_SERVER_BIN:-$(find_bin redis-server || true)}"
    [ -n "$redis_bin" ] || die "redis-server not found (Debian: apt-get install redis-server), or set CLUSTER_REDIS_URL"
    redis_port="${REDIS_PORT:-$(free_port)}"
    port_in_use "$redis_port" && die "REDIS_PORT $redis_port is in use"
    mkdir -p "$dir/redis"
    # Append-only file in the state directory: ids continue across `stop`/`start`.
    launch redis "$redis_bin" "$redis_bin" --port "$redis_port" --bind 127.0.0.1 \
      --dir "$dir/redis" --appendonly yes --save "" --maxmemory-policy noeviction
    wait_until redis 20 redis_ping "$redis_port"
    redis_url="redis://127.0.0.1:$redis_port"
    say "redis-server on 127.0.0.1:$redis_port"
  fi

  # --- gateways -----------------------------------------------------------------------
  local prefix="${INSTANCE_PREFIX:-local}" i port id urls=() ids=() ports=()
  # The web client pages a room's older history over the server API: show the newest 50
  # on a fresh join (never more than HISTORY_SIZE, which the gateway requires).
  local replay="${JOIN_REPLAY_LIMIT:-50}"
  if [[ "${HISTORY_SIZE:-}" =~ ^[0-9]+$ ]] && [[ "$replay" =~ ^[0-9]+$ ]] && [ "$HISTORY_SIZE" -lt "$replay" ]; then
    replay="$HISTORY_SIZE"
  fi
  # The API exists only with a key: yours, else a random one for this cluster (in
  # cluster.env). Exported, not on the command line, so it stays out of the logs.
  API_KEY="${API_KEY:-$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')}"
  export API_KEY
  for i in $(seq 1 "$n"); do
    port="$(free_port)"
    id="$prefix-$i"
    # APP_ENV=production: never read a .env file.
    launch "gateway-$id" "$gw_bin" env "APP_ENV=${APP_ENV:-production}" \
      HOST=127.0.0.1 "PORT=$port" "REDIS_URL=$redis_url" "INSTANCE_ID=$id" \
      TRUSTED_PROXIES=127.0.0.1/32 "JOIN_REPLAY_LIMIT=$replay" \
      "LOG_FORMAT=${LOG_FORMAT:-pretty}" NO_COLOR=1 "$gw_bin"
    urls+=("http://127.0.0.1:$port"); ids+=("$id"); ports+=("$port")
  done
  for i in "${!ids[@]}"; do
    ready() { [ "$(http_status "$1/readyz")" = 200 ]; }
    wait_until "gateway-${ids[$i]}" 30 ready "${urls[$i]}"
    say "gateway ${ids[$i]} on ${urls[$i]#http://} (ready)"
  done

  # --- nginx --------------------------------------------------------------------------
  local nport="${NGINX_PORT:-}"
  if [ -z "$nport" ]; then
    if port_in_use 8080; then nport="$(free_port)"; else nport=8080; fi
  elif [ "$nport" = auto ] || [ "$nport" = 0 ]; then
    nport="$(free_port)"
  fi
  port_in_use "$nport" && die "NGINX_PORT $nport is in use"
  local ngx="$dir/nginx"
  rm -rf "$ngx"
  mkdir -p "$ngx/conf"
  # nginx workers drop root privileges (when started as root): let them reach the prefix.
  chmod 755 "$dir" "$ngx"
  # The deploy config as is; only the two include files are generated.
  cp "$root/deploy/nginx/nginx.conf" "$ngx/conf/nginx.conf"
  {
    echo "# generated by deploy/local/cluster.sh"
    echo "upstream chat {"
    for port in "${ports[@]}"; do echo "    server 127.0.0.1:$port max_fails=1 fail_timeout=5s;"; done
    echo "}"
  } > "$ngx/conf/upstream.conf"
  echo "listen 127.0.0.1:$nport;" > "$ngx/conf/listen.conf"
  local nginx_args=(-p "$ngx" -c "$ngx/conf/nginx.conf" -e "$ngx/error.log")
  # stdout to /dev/null: `access_log /dev/stdout` cannot be opened on every kind of stdout.
  if ! "$nginx_bin" "${nginx_args[@]}" -t > /dev/null 2> "$ngx/nginx-t.log"; then
    cat "$ngx/nginx-t.log" >&2; die "nginx -t failed"
  fi
  launch nginx "$nginx_bin" "$nginx_bin" "${nginx_args[@]}" -g 'daemon off;'
  local url="http://127.0.0.1:$nport"
  healthy() { [ "$(http_status "$url/healthz")" = 200 ]; }
  wait_until nginx 20 healthy
  {
    echo "# written by deploy/local/cluster.sh start $n"
    echo "CLUSTER_DIR='$dir'"
    echo "CLUSTER_URL='$url'"
    echo "CLUSTER_WS_URL='ws://127.0.0.1:$nport/ws'"
    echo "NGINX_PORT='$nport'"
    echo "REDIS_URL='$redis_url'"
    echo "REDIS_PORT='$redis_port'"
    echo "GATEWAY_COUNT='$n'"
    echo "GATEWAY_URLS='${urls[*]}'"
    echo "GATEWAY_IDS='${ids[*]}'"
    echo "GATEWAY_BIN='$gw_bin'"
    echo "GATEWAY_GRACE_SECS='${SHUTDOWN_GRACE_SECS:-25}'"
    printf 'API_KEY=%q\n' "$API_KEY"
  } > "$envfile"
  chmod 600 "$envfile"
  started=1
  say "nginx on 127.0.0.1:$nport → ${ids[*]}"
  say "state in $dir (cluster.env, logs/)"
  echo
  echo "  chat: $url"
  echo
}

cmd_status() {
  local names=() name pid state port health any=0 all=1
  mapfile -t names < <(components)
  if [ ${#names[@]} -eq 0 ]; then echo "cluster: not running (no state in $dir)"; return 3; fi
  local GATEWAY_URLS="" GATEWAY_IDS="" REDIS_PORT="" NGINX_PORT="" CLUSTER_URL=""
  # shellcheck source=/dev/null
  [ -f "$envfile" ] && . "$envfile"
  local urls ids
  read -r -a urls <<< "$GATEWAY_URLS"
  read -r -a ids <<< "$GATEWAY_IDS"
  printf '%-22s %-8s %-8s %-24s %s\n' COMPONENT PID STATE ADDRESS HEALTH
  for name in "${names[@]}"; do
    if pid="$(live_pid "$name")"; then state=running; any=1; else pid="$(cut -d' ' -f1 "$piddir/$name.pid" 2>/dev/null || echo -)"; state=dead; all=0; fi
    port="" health=""
    case "$name" in
      redis) port="127.0.0.1:$REDIS_PORT"; [ $state = running ] && { redis_ping "$REDIS_PORT" && health="PONG" || health="no answer"; } ;;
      nginx) port="127.0.0.1:$NGINX_PORT"; [ $state = running ] && health="/healthz $(http_status "$CLUSTER_URL/healthz")" ;;
      gateway-*)
        local i
        for i in "${!ids[@]}"; do
          if [ "gateway-${ids[$i]}" = "$name" ]; then
            port="${urls[$i]#http://}"
            [ $state = running ] && health="/readyz $(http_status "${urls[$i]}/readyz")"
          fi
        done ;;
    esac
    printf '%-22s %-8s %-8s %-24s %s\n' "$name" "$pid" "$state" "$port" "$health"
  done
  if [ $any = 0 ]; then echo "cluster: not running"; return 3; fi
  [ -n "$CLUSTER_URL" ] && echo "chat: $CLUSTER_URL"
  [ $all = 1 ] || { echo "cluster: some components are not running"; return 1; }
}

cmd_url() {
  [ -f "$envfile" ] || die "not started (no $envfile)"
  # shellcheck source=/dev/null
  (. "$envfile"; echo "$CLUSTER_URL")
}

cmd_clean() {
  cmd_stop
  if [ -f "$marker" ]; then rm -rf "$dir"; say "removed $dir"; else die "$dir is not a cluster state directory; not removed"; fi
}

case "${1:-}" in
  start) shift; cmd_start "$@" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  url) cmd_url ;;
  clean) cmd_clean ;;
  *) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 2 ;;
esac
