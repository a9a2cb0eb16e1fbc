#!/usr/bin/env bash
# lb-vip against HAProxy (issue 5 "Speed"): the same two nginx backends behind a VIP of lb-vip
# and behind an HAProxy frontend (TCP mode, roundrobin), and nginx alone as the reference, in
# one run. Everything lives in one fresh network namespace (its own loopback, no route out):
#
#   127.0.0.1:7700   volume-mgr (lb-vip's control plane; VIPs made with fabctl)
#   127.0.0.2:80     lb-vip VIP "web"  -> 127.0.0.11:8080, 127.0.0.12:8080 (rr)
#   127.0.0.2:5201   lb-vip VIP "bulk" -> 127.0.0.21:5201 (iperf3 -s)
#   127.0.0.3:80     HAProxy frontend  -> the same two nginx (roundrobin)
#   127.0.0.3:5201   HAProxy frontend  -> the same iperf3 server
#   127.0.0.11:8080  nginx backend 1 (worker_processes 1, own prefix/config/pid file)
#   127.0.0.12:8080  nginx backend 2
#
# Workloads (wrk, 2 threads, CONNS connections, TIME s; iperf3 one stream, TIME s):
#   close      new connections per second: wrk -H 'Connection: close' (one request each)
#   keepalive  requests per second over kept-alive connections
#   p99        wrk --latency's 99th percentile of both of the above
#   bulk       iperf3 TCP throughput through the proxy to an iperf3 server
# "direct" is wrk/iperf3 straight to nginx backend 1 / the iperf3 server (one nginx worker).
# CPU seconds of each proxy, of the nginx workers and of the whole machine (/proc) are taken
# around every cell, so the table can say where the time goes.
#
#   bash bench/lbvip-wrk.sh            # RUNS=3 TIME=10: about 6 minutes
#   QUICK=1 bash bench/lbvip-wrk.sh    # smoke run: 1 run, 3 s per cell
#
# Settings (environment): RUNS (3), TIME seconds per cell (10), CONNS wrk connections (64),
# NO_BUILD=1, KEEP=1 (keep the daemons' logs), OUT (results file; default
# bench/results/lbvip-<date>.md). Cells are interleaved: every run measures every workload on
# every path, and the path order rotates from run to run, so both proxies see the same noise
# from whatever else the machine runs. Root is needed (ip netns). Needs: apt-get install -y
# haproxy nginx wrk iperf3 (the system nginx/haproxy services are not touched: own configs,
# own pid files, only the pids this script started are killed).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${QUICK:-0}" = 1 ]; then
  RUNS=${RUNS:-1}
  TIME=${TIME:-3}
fi
RUNS=${RUNS:-3}
TIME=${TIME:-10}
CONNS=${CONNS:-64}
PATHS=(lbvip haproxy direct)

die() { echo "lbvip-wrk: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root (it creates a network namespace)"
for t in haproxy nginx wrk iperf3 curl ip python3 cargo; do
  command -v "$t" >/dev/null || die "'$t' is required but not installed (apt-get install -y haproxy nginx wrk iperf3 curl)"
done

TAG="flb$$"
NS="$TAG-lb"
WORK=""
PIDS=()
CHILD=""
cleanup() {
  local rc=$? p i
  set +e
  trap - EXIT INT TERM
  local all=($CHILD)
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do all+=("${PIDS[i]}"); done
  for p in "${all[@]}"; do
    kill "$p" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null
    wait "$p" 2>/dev/null
  done
  if ip netns list 2>/dev/null | awk '{print $1}' | grep -qx "$NS"; then
    # Whatever still runs inside (an nginx worker whose master was killed -9) goes with it.
    for p in $(ip netns pids "$NS" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
    ip netns del "$NS"
  fi
  if [ "${KEEP:-0}" = 1 ] && [ -n "$WORK" ]; then echo "logs kept in $WORK" >&2
  elif [ -n "$WORK" ]; then rm -rf "$WORK"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ "${NO_BUILD:-0}" != 1 ]; then
  echo "building release binaries..." >&2
  cargo build --release -q -p lb-vip -p volume-mgr -p tools
fi
REV="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
git diff --quiet HEAD -- lb-vip volume-mgr tools 2>/dev/null || REV="$REV + uncommitted changes"

# Every daemon may use as many descriptors as the hard limit allows (HAProxy wants 2 per
# connection of its maxconn).
ulimit -n "$(ulimit -Hn)"
WORK=$(mktemp -d /tmp/fabric-lbbench.XXXXXX)
chmod 755 "$WORK" # nginx workers run as nobody and read the static file under it
BIN=$WORK/bin
mkdir -p "$BIN"
cp target/release/volume-mgr target/release/lb-vip target/release/fabctl "$BIN/"
CMDS=$WORK/commands.txt
: > "$CMDS"
logcmd() { printf '%q ' "$@" | sed 's/ $//' >> "$CMDS"; echo >> "$CMDS"; }
run() { logcmd "$@"; "$@"; }
inns() { ip netns exec "$NS" "$@"; }
# A daemon in the namespace, in the background; its pid goes to PIDS.
daemon() { # log cmd...
  local log=$1; shift
  logcmd ip netns exec "$NS" "$@"
  NO_COLOR=1 ip netns exec "$NS" "$@" >"$log" 2>&1 & PIDS+=($!)
}
wait_for() { # what log cmd...
  local what=$1 log=$2; shift 2
  for _ in $(seq 300); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  tail -n 20 "$log" >&2; die "$what did not come up"
}

# ---- the namespace --------------------------------------------------------------------------
run ip netns add "$NS"
run ip -n "$NS" link set lo up
# Per-namespace TCP settings, the same for every path: tens of thousands of short connections
# per cell would otherwise run out of ephemeral ports to the two backends (TIME_WAIT).
run ip netns exec "$NS" sysctl -q -w net.ipv4.ip_local_port_range="1024 65000" net.ipv4.tcp_tw_reuse=1 \
  net.core.somaxconn=4096 net.ipv4.tcp_max_syn_backlog=4096

# ---- backends: two nginx, one iperf3 server --------------------------------------------------
mkdir -p "$WORK/www"
python3 -c 'import sys; sys.stdout.write(("fabric lb-vip benchmark " * 43)[:1023] + "\n")' > "$WORK/www/index.html"
chmod 755 "$WORK/www"; chmod 644 "$WORK/www/index.html"
NGINX_CONF_TEXT=""
for i in 1 2; do
  d=$WORK/nginx$i
  mkdir -p "$d/logs"
  cat > "$d/nginx.conf" <<EOF
worker_processes 1;
daemon off;
master_process on;
pid $d/nginx.pid;
error_log $d/logs/error.log warn;
events { worker_connections 16384; }
http {
  access_log off;
  default_type text/html;
  keepalive_requests 1000000;
  keepalive_timeout 65s;
  client_body_temp_path $d/body;
  proxy_temp_path $d/proxy;
  fastcgi_temp_path $d/fastcgi;
  uwsgi_temp_path $d/uwsgi;
  scgi_temp_path $d/scgi;
  server {
    listen 127.0.0.1$i:8080 backlog=4096;
    root $WORK/www;
  }
}
EOF
  [ $i = 1 ] && NGINX_CONF_TEXT=$(sed "s|$WORK|\$WORK|g" "$d/nginx.conf")
  daemon "$d/logs/stdout.log" nginx -p "$d" -c "$d/nginx.conf"
done
wait_for "nginx 1" "$WORK/nginx1/logs/error.log" inns curl -sf -o /dev/null http://127.0.0.11:8080/index.html
wait_for "nginx 2" "$WORK/nginx2/logs/error.log" inns curl -sf -o /dev/null http://127.0.0.12:8080/index.html
daemon "$WORK/iperf3-server.log" iperf3 -s -B 127.0.0.21 -p 5201
sleep 0.3

# ---- lb-vip (with volume-mgr) ----------------------------------------------------------------
MGR=http://127.0.0.1:7700
fab() { run ip netns exec "$NS" "$BIN/fabctl" --manager "$MGR" "$@" >/dev/null; }
daemon "$WORK/mgr.log" "$BIN/volume-mgr" --listen 127.0.0.1:7700 --data-dir "$WORK/mgr"
wait_for volume-mgr "$WORK/mgr.log" inns "$BIN/fabctl" --manager "$MGR" vip ls
daemon "$WORK/lb-vip.log" "$BIN/lb-vip" --manager "$MGR" --node lb1 --http-listen 127.0.0.1:7950
LBVIP_PID=${PIDS[-1]}
fab vip create web --addr 127.0.0.2:80 --proto tcp --algo rr
fab vip backend add web 127.0.0.11:8080
fab vip backend add web 127.0.0.12:8080
# The iperf3 server gets a check every 10 s (both proxies): a check is an extra connection
# the server has to turn away while a test runs.
fab vip create bulk --addr 127.0.0.2:5201 --proto tcp --algo rr --check-interval 10s
fab vip backend add bulk 127.0.0.21:5201

# ---- HAProxy ---------------------------------------------------------------------------------
mkdir -p "$WORK/haproxy"
cat > "$WORK/haproxy/haproxy.cfg" <<EOF
global
  nbthread 2
  maxconn 8000
  pidfile $WORK/haproxy/haproxy.pid
defaults
  mode tcp
  balance roundrobin
  timeout connect 1s
  timeout client 60s
  timeout server 60s
frontend web
  bind 127.0.0.3:80
  default_backend web
backend web
  server n1 127.0.0.11:8080 check inter 2s
  server n2 127.0.0.12:8080 check inter 2s
frontend bulk
  bind 127.0.0.3:5201
  default_backend bulk
backend bulk
  server i1 127.0.0.21:5201 check inter 10s
EOF
HAPROXY_CONF_TEXT=$(sed "s|$WORK|\$WORK|g" "$WORK/haproxy/haproxy.cfg")
# -db: stay in the foreground (the pid we start is the one that serves).
daemon "$WORK/haproxy/haproxy.log" haproxy -db -f "$WORK/haproxy/haproxy.cfg"
HAPROXY_PID=${PIDS[-1]}

# Both proxies answer, and lb-vip spreads over both backends, before anything is measured.
wait_for "HAProxy" "$WORK/haproxy/haproxy.log" inns curl -sf -o /dev/null http://127.0.0.3/index.html
wait_for "lb-vip VIP web" "$WORK/lb-vip.log" inns curl -sf -o /dev/null http://127.0.0.2/index.html
inns curl -sf http://127.0.0.2/index.html | cmp -s - "$WORK/www/index.html" || die "the VIP serves something else than the file"
backends_used() {
  inns curl -sf http://127.0.0.1:7950/metrics | python3 -c '
import re, sys
t = sys.stdin.read()
n = [float(v) for v in re.findall(r"lbvip_backend_connections_total\{vip=\"web\",backend=\"[^\"]+\"\} ([0-9.e+]+)", t)]
sys.exit(0 if len(n) == 2 and min(n) > 0 else 1)'
}
for _ in $(seq 10); do inns curl -sf -o /dev/null http://127.0.0.2/index.html; done
backends_used || echo "lbvip-wrk: warning: could not see both backends used in lb-vip's /metrics" >&2
wait_for "iperf3 through lb-vip" "$WORK/lb-vip.log" inns timeout 10 iperf3 -c 127.0.0.2 -p 5201 -n 1M -J
wait_for "iperf3 through HAProxy" "$WORK/haproxy/haproxy.log" inns timeout 10 iperf3 -c 127.0.0.3 -p 5201 -n 1M -J

# ---- cells -----------------------------------------------------------------------------------
# The pids whose CPU time is taken: the proxies and the two nginx workers.
NGINX_WORKERS=()
for i in 1 2; do
  m=$(cat "$WORK/nginx$i/nginx.pid")
  NGINX_WORKERS+=($(pgrep -P "$m"))
done
[ ${#NGINX_WORKERS[@]} = 2 ] || die "expected one worker per nginx, found ${NGINX_WORKERS[*]}"
LBVIP_REAL=$(pgrep -P "$LBVIP_PID" -x lb-vip || echo "$LBVIP_PID")
HAPROXY_REAL=$(pgrep -P "$HAPROXY_PID" -x haproxy || echo "$HAPROXY_PID")
for p in "$LBVIP_REAL" "$HAPROXY_REAL"; do [ -r "/proc/$p/stat" ] || die "no /proc/$p/stat"; done
ticks() { # pids... -> summed utime+stime in clock ticks
  local t=0 p
  for p in "$@"; do
    t=$((t + $(awk '{sub(/^.*\) /, ""); print $12 + $13}' "/proc/$p/stat")))
  done
  echo $t
}
ctxsw() { # pid -> context switches (voluntary + involuntary) of all its threads
  cat /proc/"$1"/task/*/status 2>/dev/null | awk '/^(non)?voluntary_ctxt_switches/{n += $2} END {print n + 0}'
}
busy() { awk '/^cpu /{print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat; }
HZ=$(getconf CLK_TCK)

RESULTS=$WORK/results.tsv
: > "$RESULTS"
target() { # path kind -> host:port
  case "$1:$2" in
    lbvip:web) echo 127.0.0.2:80 ;; haproxy:web) echo 127.0.0.3:80 ;; direct:web) echo 127.0.0.11:8080 ;;
    lbvip:bulk) echo 127.0.0.2:5201 ;; haproxy:bulk) echo 127.0.0.3:5201 ;; direct:bulk) echo 127.0.0.21:5201 ;;
  esac
}
note_cmd() { grep -qxF "$1" "$CMDS" || echo "$1" >> "$CMDS"; }
cell() { # run path workload
  local r=$1 path=$2 w=$3 hp out args
  out=$WORK/out.txt
  case $w in
    close|keepalive)
      hp=$(target "$path" web)
      args=(-t 2 -c "$CONNS" -d "${TIME}s" --latency)
      [ "$w" = close ] && args+=(-H 'Connection: close')
      args+=("http://$hp/index.html")
      note_cmd "ip netns exec \$NS $(printf '%q ' wrk "${args[@]}" | sed 's/ $//')"
      ;;
    bulk)
      hp=$(target "$path" bulk)
      args=(-c "${hp%:*}" -p "${hp#*:}" -t "$TIME" -J)
      note_cmd "ip netns exec \$NS $(printf '%q ' iperf3 "${args[@]}" | sed 's/ $//')"
      ;;
  esac
  local load pt0 ng0 b0 t0 pt1 ng1 b1 t1 cs0 cs1 proxy_pid
  load=$(cut -d' ' -f1 /proc/loadavg)
  case $path in lbvip) proxy_pid=$LBVIP_REAL ;; haproxy) proxy_pid=$HAPROXY_REAL ;; *) proxy_pid="" ;; esac
  pt0=$( [ -n "$proxy_pid" ] && ticks "$proxy_pid" || echo 0)
  ng0=$(ticks "${NGINX_WORKERS[@]}")
  cs0=$( [ -n "$proxy_pid" ] && ctxsw "$proxy_pid" || echo 0)
  read -r b0 t0 < <(busy)
  if [ "$w" = bulk ]; then
    inns timeout $((TIME + 30)) iperf3 "${args[@]}" > "$out" 2>&1 & CHILD=$!
  else
    inns timeout $((TIME + 30)) wrk "${args[@]}" > "$out" 2>&1 & CHILD=$!
  fi
  wait "$CHILD" || { cat "$out" >&2; CHILD=""; die "$w on $path failed"; }
  CHILD=""
  pt1=$( [ -n "$proxy_pid" ] && ticks "$proxy_pid" || echo 0)
  ng1=$(ticks "${NGINX_WORKERS[@]}")
  cs1=$( [ -n "$proxy_pid" ] && ctxsw "$proxy_pid" || echo 0)
  read -r b1 t1 < <(busy)
  python3 - "$out" "$r" "$path" "$w" "$load" "$(( pt1 - pt0 ))" "$(( ng1 - ng0 ))" "$(( b1 - b0 ))" "$(( t1 - t0 ))" "$HZ" "$(( cs1 - cs0 ))" >> "$RESULTS" <<'PY'
import json, re, sys
f, r, path, w, load, pt, ng, b, t, hz, cs = sys.argv[1:]
text = open(f).read()
out = []
def emit(k, v):
    out.append("%s\t%s\t%s\t%s" % (r, path, k, v))
if w == "bulk":
    j = json.loads(text)
    e = j["end"]
    bps = e["sum_received"]["bits_per_second"]
    secs = e["sum_received"]["seconds"]
    emit("bulk_gbps", "%.6f" % (bps / 1e9))
    work = bps * secs / 8 / 1e9  # GB moved
else:
    m = re.search(r"Requests/sec:\s+([0-9.]+)", text)
    if not m:
        sys.exit("no Requests/sec in wrk output:\n" + text)
    rps = float(m.group(1))
    n = int(re.search(r"(\d+) requests in", text).group(1))
    unit = {"us": 1.0, "ms": 1000.0, "s": 1e6, "m": 6e7}
    m = re.search(r"^\s*99%\s+([0-9.]+)(us|ms|s|m)\s*$", text, re.M)
    if not m:
        sys.exit("no 99% line in wrk output:\n" + text)
    emit(w + "_rps", "%.2f" % rps)
    emit(w + "_p99_us", "%.1f" % (float(m.group(1)) * unit[m.group(2)]))
    errs = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        errs += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        errs += int(m.group(1))
    emit(w + "_errors", str(errs))
    work = n / 1e4  # units of 10k requests
hz = float(hz)
if path != "direct":
    emit(w + "_proxy_cpu", "%.4f" % (int(pt) / hz / work))
    emit(w + "_proxy_cs", "%.1f" % (int(cs) / work))
emit(w + "_nginx_cpu", "%.4f" % (int(ng) / hz / work))
emit(w + "_busy", "%.4f" % (int(b) / max(1, int(t))))
emit(w + "_load", load)
print("\n".join(out))
PY
}

CELLS=$(( RUNS * 3 * ${#PATHS[@]} ))
echo "uptime at start: $(uptime)" >&2
UPTIME_START=$(uptime)
echo "warming up (1 s of each path)..." >&2
for p in "${PATHS[@]}"; do inns timeout 30 wrk -t 2 -c "$CONNS" -d 1s "http://$(target "$p" web)/index.html" >/dev/null; done
echo "running $CELLS cells ($RUNS runs x 3 workloads x ${#PATHS[@]} paths, ${TIME}s each)..." >&2
START=$(date +%s)
n=0
for r in $(seq "$RUNS"); do
  # Rotate the path order from run to run.
  order=()
  for ((i = 0; i < ${#PATHS[@]}; i++)); do order+=("${PATHS[(i + r - 1) % ${#PATHS[@]}]}"); done
  for w in close keepalive bulk; do
    for path in "${order[@]}"; do
      n=$((n + 1))
      printf '[%d/%d %ds] run %d %-9s %-7s load %s\n' $n $CELLS $(( $(date +%s) - START )) "$r" "$w" "$path" "$(cut -d' ' -f1 /proc/loadavg)" >&2
      cell "$r" "$path" "$w"
      # Let the sockets of the previous cell leave the accept queues and FIN states.
      sleep 1
    done
  done
done
for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null || die "a daemon exited during the run (logs in $WORK; KEEP=1 keeps them)"; done
UPTIME_END=$(uptime)
ELAPSED=$(( $(date +%s) - START ))

mkdir -p bench/results
OUT=${OUT:-bench/results/lbvip-$(date +%Y-%m-%d-%H%M).md}
{
python3 - "$RESULTS" "$RUNS" "$TIME" "$CONNS" "$REV" "$(nproc)" "$(haproxy -v | head -1 | awk '{print $3}')" \
  "$(nginx -v 2>&1 | sed 's/.*nginx\///')" "$UPTIME_START" "$UPTIME_END" <<'PY'
import sys, statistics, collections
_, path, runs, time_s, conns, rev, cpus, hav, ngv, up0, up1 = sys.argv
rows = collections.defaultdict(list)
for line in open(path):
    run, p, k, v = line.rstrip("\n").split("\t")
    rows[(p, k)].append(float(v))
med = {k: statistics.median(v) for k, v in rows.items()}
def g(p, k):
    return med.get((p, k))
print(f"lb-vip (release build, Fabric at {rev}) against HAProxy {hav} (TCP mode, roundrobin, "
      f"nbthread 2 = its default on {cpus} CPUs, no splicing: Debian's defaults) over the same two "
      f"nginx {ngv} backends (worker_processes 1 each, a 1 KiB static file), and nginx backend 1 "
      f"alone (\"direct\", one worker), in one network namespace on loopback. wrk: 2 threads, "
      f"{conns} connections, {time_s} s per cell; iperf3: one stream, {time_s} s. Medians of "
      f"{runs} run(s), cells interleaved (path order rotating per run). {cpus} CPUs shared with "
      f"the other helpers' builds: load at start `{up0.strip()}`, at end `{up1.strip()}`.")
print()
print("| workload | lb-vip | HAProxy | nginx direct | **lb-vip vs HAProxy** | lb-vip / direct | HAProxy / direct |")
print("|---|---|---|---|---|---|---|")
# (key, name, format, higher is better)
ROWS = (("close_rps", "new connections (Connection: close), req/s", "%.0f", True),
        ("keepalive_rps", "keep-alive requests, req/s", "%.0f", True),
        ("close_p99_us", "p99 latency, new connections", "%.0f µs", False),
        ("keepalive_p99_us", "p99 latency, keep-alive", "%.0f µs", False),
        ("bulk_gbps", "bulk TCP (iperf3, 1 stream)", "%.2f Gbit/s", True))
for k, name, fmt, up in ROWS:
    a, b, d = g("lbvip", k), g("haproxy", k), g("direct", k)
    f = lambda x: fmt % x if x is not None else "-"
    def ratio(x, y):
        if not x or not y:
            return "-"
        return "%.2fx" % ((x / y) if up else (y / x))
    print(f"| {name} | {f(a)} | {f(b)} | {f(d)} | **{ratio(a, b)}** | {ratio(a, d)} | {ratio(b, d)} |")
print()
print("\"lb-vip vs HAProxy\" is a speed-up: for rates lb-vip / HAProxy, for latency HAProxy / "
      "lb-vip, so above 1.0x lb-vip is ahead on every row. Target (issue 5): >= 1.0x on every "
      "row, 1.3x on new connections. The / direct columns are the same kind of ratio against "
      "nginx alone (one backend, no proxy).")
print()
print("Where the time goes (medians): CPU seconds of the proxy process and of the two nginx "
      "workers per 10,000 requests (per GB for bulk), the proxy's context switches (all its "
      "threads, voluntary + involuntary) per the same unit, and how busy the whole machine was "
      "during the cell (all CPUs, /proc/stat).")
print()
print("| workload | path | proxy CPU | proxy context switches | nginx CPU | machine busy | load avg 1 min | wrk errors |")
print("|---|---|---|---|---|---|---|---|")
for w, unit in (("close", "s/10k req"), ("keepalive", "s/10k req"), ("bulk", "s/GB")):
    for p in ("lbvip", "haproxy", "direct"):
        pc, nc, bz, ld = g(p, w + "_proxy_cpu"), g(p, w + "_nginx_cpu"), g(p, w + "_busy"), g(p, w + "_load")
        cs = g(p, w + "_proxy_cs")
        er = rows.get((p, w + "_errors"))
        print("| %s | %s | %s | %s | %s | %s | %s | %s |" % (
            w, p,
            ("%.3f %s" % (pc, unit)) if pc is not None else "-",
            ("%.0f per %s" % (cs, unit.split("/")[1])) if cs is not None else "-",
            ("%.3f %s" % (nc, unit)) if (nc is not None and w != "bulk") else "-",
            ("%.0f%%" % (bz * 100)) if bz is not None else "-",
            ("%.2f" % ld) if ld is not None else "-",
            ("%d" % sum(er)) if er is not None else "-"))
print()
print("Every run:")
print()
print("| metric | path | runs |")
print("|---|---|---|")
for k in ("close_rps", "keepalive_rps", "close_p99_us", "keepalive_p99_us", "bulk_gbps"):
    for p in ("lbvip", "haproxy", "direct"):
        v = rows.get((p, k), [])
        print(f"| {k} | {p} | " + "; ".join("%.2f" % x if k == "bulk_gbps" else "%.0f" % x for x in v) + " |")
PY
echo
echo "Commands (\$NS is the run's namespace, flb<pid>-lb; \$WORK its temp dir):"
echo
echo '```sh'
sed -e "s|$WORK|\$WORK|g" -e "s|$NS|\$NS|g" "$CMDS"
echo '```'
echo
echo "nginx.conf of backend 1 (backend 2 the same on 127.0.0.12):"
echo
echo '```nginx'
echo "$NGINX_CONF_TEXT"
echo '```'
echo
echo "haproxy.cfg:"
echo
echo '```'
echo "$HAPROXY_CONF_TEXT"
echo '```'
} > "$OUT"
cat "$OUT"
echo "written to $OUT (${ELAPSED}s of measuring)" >&2
