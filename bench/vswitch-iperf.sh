#!/usr/bin/env bash
# Overlay network speed: two "VMs" (network namespaces) on two namespace hosts talk through
# Fabric's vswitch (tap ports, VXLAN over the underlay), against the same topology built with
# the kernel (in each host: a bridge holding a VXLAN device and a veth to the VM namespace),
# in one run, on one underlay bridge (198.18.0.0/24, MTU 1500, overlay MTU 1450 on both paths).
# Measures iperf3 TCP throughput (one stream), the 64-byte UDP packet rate (iperf3 -u -l 64
# -b 0, packets the receiver got per second) and ping round-trip latency (busybox ping -i 0.01,
# p50/p99 of every reply's time). Prints a markdown table of medians with vswitch/kernel
# ratios and the commands, and writes both to bench/results/vswitch-<date>.md.
#
#   bash bench/vswitch-iperf.sh            # RUNS=3 TIME=10 PINGS=500: about 3 minutes
#   QUICK=1 bash bench/vswitch-iperf.sh    # smoke run: 1 run, 3 s per cell, 200 pings
#
# Settings (environment): RUNS (3), TIME seconds per iperf3 cell (10), PINGS (500), NO_BUILD=1,
# KEEP=1 (keep the daemons' logs), ONLY=vswitch|kernel (measure one path; no ratios). Cells are interleaved: every run measures every workload on
# both paths, the path order alternating from run to run. Root is needed (ip netns).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${QUICK:-0}" = 1 ]; then
  RUNS=${RUNS:-1}
  TIME=${TIME:-3}
  PINGS=${PINGS:-200}
fi
RUNS=${RUNS:-3}
TIME=${TIME:-10}
PINGS=${PINGS:-500}
case "${ONLY:-}" in
  "") PATHS=(vswitch kernel) ;;
  vswitch|kernel) PATHS=("$ONLY") ;;
  *) echo "vswitch-iperf: ONLY must be vswitch or kernel" >&2; exit 1 ;;
esac
want() { [[ " ${PATHS[*]} " == *" $1 "* ]]; }

die() { echo "vswitch-iperf: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root (it creates network namespaces)"
for t in iperf3 busybox ip bridge python3 cargo; do
  command -v "$t" >/dev/null || die "'$t' is required but not installed (apt-get install iperf3 busybox-static iproute2)"
done

TAG="fvb$$"
WORK=""
PIDS=()
cleanup() {
  local rc=$? p i
  set +e
  trap - EXIT INT TERM
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    p=${PIDS[i]}
    kill "$p" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null
    wait "$p" 2>/dev/null
  done
  for ns in $(ip netns list | awk '{print $1}' | grep "^$TAG-"); do
    # Whatever still runs inside (an iperf3 the kill above missed) goes with its namespace.
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
    ip netns del "$ns"
  done
  if [ "${KEEP:-0}" = 1 ] && [ -n "$WORK" ]; then echo "logs kept in $WORK" >&2
  elif [ -n "$WORK" ]; then rm -rf "$WORK"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ "${NO_BUILD:-0}" != 1 ] && want vswitch; then
  echo "building release binaries..." >&2
  cargo build --release -q -p vswitch -p volume-mgr -p tools
fi
REV="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
git diff --quiet HEAD -- vswitch volume-mgr tools 2>/dev/null || REV="$REV + uncommitted changes"

WORK=$(mktemp -d /tmp/fabric-vbench.XXXXXX)
BIN=$WORK/bin
mkdir -p "$BIN"
want vswitch && cp target/release/volume-mgr target/release/vswitch target/release/fabctl "$BIN/"
CMDS=$WORK/commands.txt
: > "$CMDS"
logcmd() { printf '%q ' "$@" | sed 's/ $//' >> "$CMDS"; echo >> "$CMDS"; }
run() { logcmd "$@"; "$@"; }
inns() { local ns=$1; shift; ip netns exec "$TAG-$ns" "$@"; }
no_ipv6() { inns "$1" sh -c 'echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6; echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6'; }

# ---- underlay: h0 (manager), h1 h2 (vswitch), k1 k2 (kernel bridge + vxlan) on one bridge ----
run ip netns add "$TAG-sw"
run ip -n "$TAG-sw" link add br0 type bridge
run ip -n "$TAG-sw" link set br0 up
HOSTS=(h0 h1 h2 k1 k2)
for i in "${!HOSTS[@]}"; do
  ns="$TAG-${HOSTS[i]}"
  run ip netns add "$ns"
  no_ipv6 "${HOSTS[i]}"
  run ip link add name eth0 netns "$ns" type veth peer name "p$i" netns "$TAG-sw"
  run ip -n "$TAG-sw" link set "p$i" master br0
  run ip -n "$TAG-sw" link set "p$i" up
  run ip -n "$ns" link set lo up
  run ip -n "$ns" addr add "198.18.0.$((i + 1))/24" dev eth0
  run ip -n "$ns" link set eth0 up
done
# VM namespaces: vs1 vs2 (vswitch ports), kv1 kv2 (kernel path).
for v in vs1 vs2 kv1 kv2; do
  run ip netns add "$TAG-$v"
  no_ipv6 "$v"
  run ip -n "$TAG-$v" link set lo up
done

# ---- vswitch path -----------------------------------------------------------------------------
if want vswitch; then
  MGR=http://198.18.0.1:7700
  fab() { inns h0 "$BIN/fabctl" --manager "$MGR" "$@"; }
  logcmd ip netns exec "$TAG-h0" "$BIN/volume-mgr" --listen 198.18.0.1:7700 --data-dir "$WORK/mgr"
  NO_COLOR=1 ip netns exec "$TAG-h0" "$BIN/volume-mgr" --listen 198.18.0.1:7700 --data-dir "$WORK/mgr" >/dev/null 2>"$WORK/mgr.log" & PIDS+=($!)
  for _ in $(seq 300); do fab switch ls >/dev/null 2>&1 && break; sleep 0.1; done
  fab switch ls >/dev/null 2>&1 || { tail -n 20 "$WORK/mgr.log" >&2; die "volume-mgr did not answer"; }
  for i in 1 2; do
    c=("$BIN/vswitch" --manager "$MGR" --node "h$i" --underlay-ip "198.18.0.$((i + 1))" --vxlan-port 4789)
    logcmd ip netns exec "$TAG-h$i" "${c[@]}"
    NO_COLOR=1 ip netns exec "$TAG-h$i" "${c[@]}" >/dev/null 2>"$WORK/vswitch-h$i.log" & PIDS+=($!)
  done
  switches_up() {
    fab -o json switch ls 2>/dev/null |
      python3 -c 'import json, sys; sys.exit(0 if sum(1 for s in json.load(sys.stdin) if s.get("state") == "up") >= 2 else 1)'
  }
  for _ in $(seq 300); do switches_up && break; sleep 0.1; done
  switches_up || { tail -n 20 "$WORK"/vswitch-h*.log >&2; die "the two vswitches are not up"; }
  run ip netns exec "$TAG-h0" "$BIN/fabctl" --manager "$MGR" net create bench --vni 4242 --subnet 10.42.0.0/24 >/dev/null
  for i in 1 2; do
    run ip netns exec "$TAG-h0" "$BIN/fabctl" --manager "$MGR" port create "vs$i" --net bench --node "h$i" --kind tap \
      --netns "$TAG-vs$i" --ip "10.42.0.$i" >/dev/null
  done
  for i in 1 2; do
    for _ in $(seq 200); do ip -n "$TAG-vs$i" link show vs$i >/dev/null 2>&1 && break; sleep 0.1; done
    ip -n "$TAG-vs$i" link show "vs$i" >/dev/null 2>&1 || { tail -n 20 "$WORK/vswitch-h$i.log" >&2; die "vswitch h$i did not put vs$i into its VM namespace"; }
    run ip -n "$TAG-vs$i" addr add "10.42.0.$i/24" dev "vs$i"
    run ip -n "$TAG-vs$i" link set "vs$i" up
  done
fi

# ---- kernel path: in k1/k2 a bridge with vxlan0 and a veth to the VM namespace ------------------
for i in 1 2; do
  local_ip="198.18.0.$((i + 3))"; remote_ip="198.18.0.$((6 - i))"
  k="$TAG-k$i"
  run ip -n "$k" link add br0 type bridge
  run ip -n "$k" link add vxlan0 type vxlan id 4242 dstport 4789 local "$local_ip" remote "$remote_ip" dev eth0
  run ip -n "$k" link set vxlan0 master br0
  run ip -n "$k" link add "kv$i" type veth peer name eth0 netns "$TAG-kv$i"
  run ip -n "$k" link set "kv$i" mtu 1450
  run ip -n "$k" link set "kv$i" master br0
  for l in vxlan0 "kv$i" br0; do run ip -n "$k" link set "$l" up; done
  run ip -n "$TAG-kv$i" link set eth0 mtu 1450
  run ip -n "$TAG-kv$i" addr add "10.43.0.$i/24" dev eth0
  run ip -n "$TAG-kv$i" link set eth0 up
done

# Both paths answer before anything is measured.
for p in "vs1 10.42.0.2" "kv1 10.43.0.2"; do
  read -r ns ip <<<"$p"
  want "$( [ "$ns" = vs1 ] && echo vswitch || echo kernel)" || continue
  ok=0
  for _ in $(seq 40); do inns "$ns" busybox ping -c 1 -W 1 "$ip" >/dev/null 2>&1 && { ok=1; break; }; done
  [ $ok = 1 ] || { tail -n 20 "$WORK"/vswitch-h*.log >&2; die "$ns cannot reach $ip"; }
done
want vswitch && echo "vs1: $(ip -n "$TAG-vs1" -o link show vs1 | grep -o 'mtu [0-9]*')" >&2

# iperf3 servers in the receiving VMs.
for p in "vs2 10.42.0.2" "kv2 10.43.0.2"; do
  read -r ns ip <<<"$p"
  want "$( [ "$ns" = vs2 ] && echo vswitch || echo kernel)" || continue
  logcmd ip netns exec "$TAG-$ns" iperf3 -s -B "$ip"
  ip netns exec "$TAG-$ns" iperf3 -s -B "$ip" >"$WORK/iperf3-$ns.log" 2>&1 & PIDS+=($!)
done
sleep 0.5

RESULTS=$WORK/results.tsv
: > "$RESULTS"
client_ns() { [ "$1" = vswitch ] && echo vs1 || echo kv1; }
server_ip() { [ "$1" = vswitch ] && echo 10.42.0.2 || echo 10.43.0.2; }
iperf_cell() { # run path kind
  local ns ip args
  ns=$(client_ns "$2"); ip=$(server_ip "$2")
  if [ "$3" = tcp ]; then args=(-c "$ip" -t "$TIME" -J)
  else args=(-c "$ip" -u -l 64 -b 0 -t "$TIME" -J); fi
  local line; line=$(printf '%q ' iperf3 "${args[@]}" | sed 's/ $//')
  grep -qxF "ip netns exec \$VM1 $line" "$CMDS" || echo "ip netns exec \$VM1 $line" >> "$CMDS"
  inns "$ns" iperf3 "${args[@]}" > "$WORK/out.json" || { cat "$WORK/out.json" >&2; die "iperf3 $3 on $2 failed"; }
  python3 - "$WORK/out.json" "$1" "$2" "$3" >> "$RESULTS" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
e = j["end"]
if sys.argv[4] == "tcp":
    v = e["sum_received"]["bits_per_second"] / 1e9
else:
    s = e["sum"]
    v = (s["packets"] - s["lost_packets"]) / s["seconds"]
print("\t".join(sys.argv[2:5]) + "\t%.6f" % v)
PY
}
ping_cell() { # run path
  local ns ip
  ns=$(client_ns "$2"); ip=$(server_ip "$2")
  grep -qxF "ip netns exec \$VM1 busybox ping -i 0.01 -c $PINGS \$VM2_IP" "$CMDS" || echo "ip netns exec \$VM1 busybox ping -i 0.01 -c $PINGS \$VM2_IP" >> "$CMDS"
  inns "$ns" busybox ping -i 0.01 -c "$PINGS" "$ip" > "$WORK/ping.txt" 2>&1 || true
  python3 - "$WORK/ping.txt" "$1" "$2" "$PINGS" >> "$RESULTS" <<'PY'
import re, statistics, sys
t = sorted(float(x) for x in re.findall(r"time=([0-9.]+) ms", open(sys.argv[1]).read()))
if len(t) < int(sys.argv[4]) // 2:
    sys.exit("too few ping replies: %d" % len(t))
q = lambda p: t[min(len(t) - 1, int(round(p * (len(t) - 1))))] * 1000
print("%s\t%s\tping_p50\t%.1f" % (sys.argv[2], sys.argv[3], q(0.5)))
print("%s\t%s\tping_p99\t%.1f" % (sys.argv[2], sys.argv[3], q(0.99)))
print("%s\t%s\tping_loss\t%d" % (sys.argv[2], sys.argv[3], int(sys.argv[4]) - len(t)))
PY
}

CELLS=$(( RUNS * 3 * ${#PATHS[@]} ))
echo "running $CELLS cells ($RUNS runs x 3 workloads x ${#PATHS[@]} paths, ${TIME}s iperf3 cells, $PINGS pings)..." >&2
START=$(date +%s)
n=0
for r in $(seq "$RUNS"); do
  if [ $((r % 2)) = 1 ]; then order=("${PATHS[@]}"); else order=(); for ((i = ${#PATHS[@]} - 1; i >= 0; i--)); do order+=("${PATHS[i]}"); done; fi
  for w in tcp udp64 ping; do
    for path in "${order[@]}"; do
      n=$((n + 1))
      printf '[%d/%d %ds] run %d %-5s %s\n' $n $CELLS $(( $(date +%s) - START )) "$r" "$w" "$path" >&2
      case $w in
        tcp) iperf_cell "$r" "$path" tcp ;;
        udp64) iperf_cell "$r" "$path" udp64 ;;
        ping) ping_cell "$r" "$path" ;;
      esac
    done
  done
done
for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null || die "a daemon exited during the run (logs in $WORK; KEEP=1 keeps them)"; done

mkdir -p bench/results
OUT="bench/results/vswitch-$(date +%Y-%m-%d-%H%M).md"
{
python3 - "$RESULTS" "$RUNS" "$TIME" "$PINGS" "$REV" "$(nproc)" <<'PY'
import sys, statistics, collections
_, path, runs, time_s, pings, rev, cpus = sys.argv
rows = collections.defaultdict(list)
for line in open(path):
    run, p, w, v = line.rstrip("\n").split("\t")
    rows[(p, w)].append(float(v))
med = {k: statistics.median(v) for k, v in rows.items()}
print(f"Two VMs (network namespaces) on two namespace hosts, one underlay bridge (MTU 1500, overlay "
      f"MTU 1450). vswitch: Fabric's vswitch on each host, tap ports, release build. kernel: in each "
      f"host a bridge with a VXLAN device (same VNI, UDP 4789) and a veth to the VM. Medians of "
      f"{runs} run(s); iperf3 cells of {time_s} s, {pings} pings at 10 ms. {cpus} CPUs. Fabric at {rev}.")
print()
print("| workload | vswitch | kernel bridge + vxlan | vswitch / kernel |")
print("|---|---|---|---|")
for w, name, fmt in (("tcp", "TCP throughput, 1 stream", "%.2f Gbit/s"),
                     ("udp64", "UDP 64-byte packets received", "%.0f pkt/s"),
                     ("ping_p50", "ping RTT p50", "%.0f µs"),
                     ("ping_p99", "ping RTT p99", "%.0f µs")):
    a, b = med.get(("vswitch", w)), med.get(("kernel", w))
    r = "%.2fx" % (a / b) if a and b else "-"
    print("| %s | %s | %s | **%s** |" % (name, fmt % a if a is not None else "-",
                                        fmt % b if b is not None else "-", r))
print()
print("For latency a ratio above 1 is slower. Target (issue 4): TCP >= 0.5x the kernel path.")
print()
print("Every run:")
print()
print("| workload | path | runs |")
print("|---|---|---|")
for w in ("tcp", "udp64", "ping_p50", "ping_p99", "ping_loss"):
    for p in ("vswitch", "kernel"):
        v = rows.get((p, w), [])
        print(f"| {w} | {p} | " + "; ".join("%.2f" % x if w == "tcp" else "%.0f" % x for x in v) + " |")
PY
echo
echo "Commands (TAG and the temp dir change from run to run; \$VM1 is $TAG-vs1 or $TAG-kv1, the"
echo "server is 10.42.0.2 (vswitch) or 10.43.0.2 (kernel)):"
echo
echo '```sh'
cat "$CMDS"
echo '```'
} > "$OUT"
cat "$OUT"
echo "written to $OUT (total $(( $(date +%s) - START ))s of measuring)" >&2
