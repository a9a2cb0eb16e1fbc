#!/usr/bin/env bash
# Self-healing speed (issue 7) on namespace hosts: volume-mgr in h0, blockd in h1..h4 (one
# bridge in 198.18.0.0/24, no route out), release binaries.
#
# (a) Recovery rate: a 3-replica volume of SIZE (1G) filled through h1's gateway, then h3's
#     blockd is SIGKILLed for good (volume-mgr --down-after 2s --out-after 2s). From the out
#     decision to every set back at 3 in-service replicas without h3: bytes copied / time, for
#     each blockd --recovery-bandwidth in THROTTLES, against the raw copy limit measured in the
#     same run: dd of the same number of bytes (iflag=direct oflag=direct, same file system)
#     and iperf3 between h1 and h4 (the copier and the new home). Ratio = rate / min(throttle,
#     limit) (target >= 0.5).
# (b) Detection to first byte copied: from h3's last heartbeat (GET /v1/nodes,
#     last_heartbeat_ms), from the out decision (first poll of GET /v1/recovery listing h3 in
#     nodes_out; polled every 100 ms), to the first copy: the gateway's log line "new replica in
#     the volume's record: copying to it" (its own timestamp) and the first poll of
#     GET /v1/recovery whose bytes_copied moved (blockd reports its counter once a second, so
#     that one lags by up to 1 s).
# (c) The I/O stall a VM sees when a replica host dies: fio (nbd engine) 4k random writes at
#     QD1 through h1 on a 256M 3-replica volume with default blockd flags (replica-timeout 5s),
#     per-I/O completion log; 5 s in, h3 dies, either as kill -9 of its blockd (its kernel
#     resets the connections at once) or as its cable pulled (nothing answers: the gateway waits
#     replica-timeout). Stall = the longest gap between two completed writes (target < 6 s).
#
# Every run starts a fresh cluster. Medians of RUNS runs; every run is listed too. Results
# (with the machine's load and the exact commands) go to bench/results/recovery-<date>.md.
#
#   bash bench/recovery.sh             # RUNS=3 SIZE=1G THROTTLES="50MiB/s 200MiB/s 0": ~10 min
#   QUICK=1 bash bench/recovery.sh     # smoke run: RUNS=1 SIZE=256M THROTTLES="50MiB/s 0"
#
# Settings (environment): RUNS, SIZE, THROTTLES (0 = unlimited), STALL_SIZE (256M),
# STALL_TIME seconds of fio per stall run (15), BENCH_DIR (/work), NO_BUILD=1, KEEP=1 (keep
# logs). Root is needed (ip netns).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${QUICK:-0}" = 1 ]; then
  RUNS=${RUNS:-1}
  SIZE=${SIZE:-256M}
  THROTTLES=${THROTTLES:-"50MiB/s 0"}
fi
RUNS=${RUNS:-3}
SIZE=${SIZE:-1G}
THROTTLES=${THROTTLES:-"50MiB/s 200MiB/s 0"}
STALL_SIZE=${STALL_SIZE:-256M}
STALL_TIME=${STALL_TIME:-15}
BENCH_DIR=${BENCH_DIR:-/work}
OUT_AFTER=2s

die() { echo "recovery: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root (it creates network namespaces)"
for t in fio ip python3 cargo iperf3 dd; do
  command -v "$t" >/dev/null || die "'$t' is required but not installed"
done
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no 'nbd' ioengine (Debian's fio has it)"

TAG="frc$$"
WORK=""
PIDS=()
BG=""
stop_pids() {
  local p i
  for p in "$@"; do
    kill "$p" 2>/dev/null || true
    for i in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
}
cleanup() {
  local rc=$? i
  set +e
  trap - EXIT INT TERM
  local all=($BG)
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do all+=("${PIDS[i]}"); done
  stop_pids "${all[@]}"
  for ns in $(ip netns list | awk '{print $1}' | grep "^$TAG-"); do ip netns del "$ns"; done
  if [ "${KEEP:-0}" = 1 ] && [ -n "$WORK" ]; then
    find "$WORK" -name '*.img' -delete; echo "logs kept in $WORK" >&2
  elif [ -n "$WORK" ]; then rm -rf "$WORK"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ "${NO_BUILD:-0}" != 1 ]; then
  echo "building release binaries..." >&2
  cargo build --release -q -p blockd -p volume-mgr -p tools
fi
REV="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
git diff --quiet HEAD -- blockd volume-mgr tools 2>/dev/null || REV="$REV + uncommitted changes"

mkdir -p "$BENCH_DIR"
WORK=$(mktemp -d "$BENCH_DIR/fabric-recbench.XXXXXX")
BIN=$WORK/bin
mkdir -p "$BIN"
cp target/release/volume-mgr target/release/blockd target/release/fabctl "$BIN/"
CMDS=$WORK/commands.txt
: > "$CMDS"
logcmd() { local l; l=$(printf '%q ' "$@" | sed 's/ $//'); grep -qxF "$l" "$CMDS" || echo "$l" >> "$CMDS"; }
run() { logcmd "$@"; "$@"; }
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$WORK/secret"
LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"

# ---- namespaces: switch + h0 (manager) + h1..h4 (blockd) on one bridge ----------------------
run ip netns add "$TAG-sw"
run ip -n "$TAG-sw" link add br0 type bridge
run ip -n "$TAG-sw" link set br0 up
for i in 0 1 2 3 4; do
  ns="$TAG-h$i"
  run ip netns add "$ns"
  run ip link add name eth0 netns "$ns" type veth peer name "p$i" netns "$TAG-sw"
  run ip -n "$TAG-sw" link set "p$i" master br0
  run ip -n "$TAG-sw" link set "p$i" up
  run ip -n "$ns" link set lo up
  run ip -n "$ns" addr add "198.18.0.$((i + 1))/24" dev eth0
  run ip -n "$ns" link set eth0 up
done
inns() { local ns=$1; shift; ip netns exec "$TAG-$ns" "$@"; }
MGR=http://198.18.0.1:7700
fabctl() { inns h0 "$BIN/fabctl" --manager "$MGR" "$@"; }

NODE_PID=()
# start_cluster DIR BANDWIDTH [blockd flags…]: volume-mgr + four blockd, fresh state.
start_cluster() {
  local d=$1 bw=$2; shift 2
  mkdir -p "$d"
  local m=("$BIN/volume-mgr" --listen 198.18.0.1:7700 --data-dir "$d/mgr" --down-after 2s --out-after "$OUT_AFTER")
  logcmd ip netns exec "$TAG-h0" "${m[@]/#$d/\$RUN}"
  ip netns exec "$TAG-h0" "${m[@]}" >/dev/null 2>"$d/mgr.log" & PIDS+=($!)
  for i in $(seq 300); do fabctl node ls >/dev/null 2>&1 && break; sleep 0.1; done
  fabctl node ls >/dev/null 2>&1 || { tail -n 20 "$d/mgr.log" >&2; die "volume-mgr did not answer"; }
  NODE_PID=()
  for i in 1 2 3 4; do
    mkdir -p "$d/h$i"
    local c=("$BIN/blockd" --manager "$MGR" --node "h$i" --listen "198.18.0.$((i + 1)):7800"
       --nbd-listen none --http-listen none --nbd-socket "$d/h$i/nbd.sock"
       --disk "$d/h$i/disk0.img:8G" --secret-file "$WORK/secret" --recovery-bandwidth "$bw" "$@")
    logcmd ip netns exec "$TAG-h$i" "${c[@]//$d/\$RUN}"
    ip netns exec "$TAG-h$i" "${c[@]}" >/dev/null 2>"$d/h$i.log" & PIDS+=($!)
    NODE_PID[$i]=$!
  done
  for i in $(seq 300); do
    fabctl node ls -o json 2>/dev/null | python3 -c '
import json, sys
sys.exit(0 if sum(1 for x in json.load(sys.stdin) if x.get("state") == "up") >= 4 else 1)' && return 0
    sleep 0.1
  done
  tail -n 5 "$d"/h*.log >&2; die "the four blockd are not up"
}
stop_cluster() {
  local i
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_pids "${PIDS[i]}"; done
  PIDS=()
}

fio_bg() { # logs the command (with the run dir as $RUN), runs fio in the background, waits
  local d=$1; shift
  logcmd fio "${@//$d/\$RUN}"
  fio "$@" & BG=$!
  local rc=0; wait $BG || rc=$?
  BG=""
  return $rc
}

# The poller: kills h3 (SIGKILL, or its cable) itself, then polls the manager every 100 ms.
POLL=$WORK/poll.py
cat > "$POLL" <<'PY'
import json, os, re, signal, subprocess, sys, time, urllib.request
mgr, vol, victim, pid, log, timeout = sys.argv[1:7]
timeout = float(timeout)
def get(path):
    with urllib.request.urlopen(mgr + path, timeout=5) as r:
        return json.load(r)
def rec():
    return get("/v1/recovery")
def rehomed():
    v = get("/v1/volumes/" + vol)
    sets = v["sets"]
    return all(len(s["members"]) == 3 and all(m["in_service"] for m in s["members"])
               and not any(m["node"] == victim for m in s["members"]) for s in sets)
def sets_on(node):
    return sum(1 for s in get("/v1/volumes/" + vol)["sets"] if any(m["node"] == node for m in s["members"]))
on_victim = sets_on(victim)
base = rec()["bytes_copied"]
t_kill = time.time()
os.kill(int(pid), signal.SIGKILL)
t_out = t_first = t_done = None
while time.time() - t_kill < timeout:
    now = time.time()
    r = rec()
    if t_out is None and victim in r["nodes_out"]:
        t_out = now
    if t_first is None and r["bytes_copied"] > base:
        t_first = now
    if t_out is not None and rehomed():
        t_done = now
        break
    time.sleep(max(0.0, 0.1 - (time.time() - now)))
if t_done is None:
    sys.exit("not re-homed after %.0f s: %s" % (timeout, json.dumps(rec())))
hb = get("/v1/nodes/" + victim)["last_heartbeat_ms"] / 1000
# The last progress report (once a second) and the counter after it.
time.sleep(2.5)
copied = rec()["bytes_copied"] - base
# The gateway's own timestamp of its first copy (tracing's RFC 3339 UTC, ANSI colours off).
first_log = None
ansi = re.compile(r"\x1b\[[0-9;]*m")
for line in open(log, errors="replace"):
    line = ansi.sub("", line)
    if "copying to it before it serves" in line:
        ts = line.split()[0].rstrip("Z")
        import datetime
        d = datetime.datetime.fromisoformat(ts[:26]).replace(tzinfo=datetime.timezone.utc)
        first_log = d.timestamp()
        break
print(json.dumps(dict(sets_on_victim=on_victim, copied=copied, t_kill=t_kill, hb=hb, t_out=t_out,
                      t_first_poll=t_first, t_first_log=first_log, t_done=t_done)))
PY

RESULTS=$WORK/results.tsv
: > "$RESULTS"
START=$(date +%s)

# ---- (a) + (b): recovery rate and detection time -------------------------------------------
n=0
NT=$(( RUNS * $(wc -w <<<"$THROTTLES") ))
for r in $(seq "$RUNS"); do
  for bw in $THROTTLES; do
    n=$((n + 1))
    printf '[%d/%d %ds] recovery run %d, --recovery-bandwidth %s, %s volume\n' $n $NT $(( $(date +%s) - START )) "$r" "$bw" "$SIZE" >&2
    d=$WORK/run$n
    start_cluster "$d" "$bw"
    run fabctl volume create vol --size "$SIZE" --replicas 3 >/dev/null
    fio_bg "$d" --name=fill --thread --rw=write --bs=1M --iodepth=8 --size="$SIZE" --output=/dev/null \
      --ioengine=nbd --uri="nbd+unix:///vol?socket=$d/h1/nbd.sock"
    logcmd python3 poll.py "$MGR" vol h3 "<pid of h3's blockd>" '$RUN/h1.log' 300
    out=$(inns h0 python3 "$POLL" "$MGR" vol h3 "${NODE_PID[3]}" "$d/h1.log" 300) \
      || { tail -n 20 "$d"/mgr.log "$d"/h1.log >&2; die "recovery did not finish"; }
    copied=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["copied"])' "$out")
    # The raw limit of the same bytes, in the same run: a direct-I/O copy on the same file
    # system, and TCP between the copier (h1) and the new home (h4).
    mib=$(( (copied + (1 << 20) - 1) >> 20 ))
    run dd if=/dev/zero of="$d/src.img" bs=1M count="$mib" oflag=direct status=none
    t0=$(date +%s.%N)
    run dd if="$d/src.img" of="$d/dst.img" bs=4M iflag=direct oflag=direct status=none
    t1=$(date +%s.%N)
    rm -f "$d/src.img" "$d/dst.img"
    dd_rate=$(python3 -c "print($mib * 1048576 / ($t1 - $t0))")
    inns h4 timeout 30 iperf3 -s -1 -B 198.18.0.5 >/dev/null 2>&1 & BG=$!
    sleep 0.5
    logcmd ip netns exec "$TAG-h1" iperf3 -c 198.18.0.5 -t 3 -J
    net_rate=$(inns h1 timeout 30 iperf3 -c 198.18.0.5 -t 3 -J | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"] / 8)')
    wait $BG || true; BG=""
    printf 'rec\t%s\t%s\t%s\t%s\t%s\n' "$r" "$bw" "$out" "$dd_rate" "$net_rate" >> "$RESULTS"
    stop_cluster
    cp "$d"/*.log "$WORK/" 2>/dev/null || true
    rm -rf "$d"
  done
done

# ---- (c): the I/O stall when a replica host dies -------------------------------------------
NS=$(( RUNS * 2 ))
n=0
for r in $(seq "$RUNS"); do
  for how in kill cable; do
    n=$((n + 1))
    printf '[%d/%d %ds] stall run %d, h3 %s\n' $n $NS $(( $(date +%s) - START )) "$r" "$how" >&2
    d=$WORK/stall$n
    start_cluster "$d" 100MiB/s
    run fabctl volume create vol --size "$STALL_SIZE" --replicas 3 >/dev/null
    fio "--name=bench" --thread --rw=randwrite --bs=4k --iodepth=1 --size="$STALL_SIZE" --time_based \
      --runtime="$STALL_TIME" --continue_on_error=all --write_lat_log="$d/lat" --log_avg_msec=0 \
      --ioengine=nbd --uri="nbd+unix:///vol?socket=$d/h1/nbd.sock" --output-format=json \
      --output="$d/fio.json" & BG=$!
    logcmd fio --name=bench --thread --rw=randwrite --bs=4k --iodepth=1 --size="$STALL_SIZE" --time_based \
      --runtime="$STALL_TIME" --continue_on_error=all '--write_lat_log=$RUN/lat' --log_avg_msec=0 \
      --ioengine=nbd '--uri=nbd+unix:///vol?socket=$RUN/h1/nbd.sock' --output-format=json
    sleep 5
    t_fault=$(date +%s.%N)
    if [ "$how" = kill ]; then
      logcmd kill -9 "<pid of h3's blockd>"
      kill -9 "${NODE_PID[3]}"
    else
      run ip -n "$TAG-sw" link set p3 down
    fi
    wait $BG || die "fio failed in stall run $n (see $d)"
    BG=""
    [ "$how" = cable ] && run ip -n "$TAG-sw" link set p3 up
    python3 - "$d" "$r" "$how" >> "$RESULTS" <<'PY'
import glob, json, sys
d, run, how = sys.argv[1:4]
t = []
for f in glob.glob(d + "/lat_lat.*.log") or glob.glob(d + "/lat_clat.*.log"):
    for line in open(f):
        p = line.split(",")
        if len(p) >= 2 and p[2].strip() == "1":
            t.append(int(p[0]))
t.sort()
if len(t) < 2:
    sys.exit("no completion log in " + d)
gaps = [(b - a, a) for a, b in zip(t, t[1:])]
g, at = max(gaps)
text = open(d + "/fio.json").read()
j = json.loads(text[text.index("{"):])["jobs"][0]
print("stall\t%s\t%s\t%d\t%d\t%d\t%d\t%.0f" % (run, how, g, at, len(t), j.get("total_err", 0),
      j["write"]["iops"]))
PY
    stop_cluster
    rm -rf "$d"
  done
done
LOAD_END="$(cut -d' ' -f1-3 /proc/loadavg)"

mkdir -p bench/results
OUT="bench/results/recovery-$(date +%Y-%m-%d-%H%M).md"
{
python3 - "$RESULTS" "$RUNS" "$SIZE" "$REV" "$LOAD_START" "$LOAD_END" "$(nproc)" "$OUT_AFTER" "$STALL_SIZE" "$STALL_TIME" <<'PY'
import collections, json, re, statistics, sys
path, runs, size, rev, load0, load1, ncpu, out_after, ssize, stime = sys.argv[1:11]
def bw_bytes(s):
    s = s.strip().removesuffix("/s")
    if s in ("0", "none", "unlimited"):
        return 0
    m = re.fullmatch(r"([0-9.]+)([KMGT])iB", s)
    return float(m.group(1)) * 1024 ** (" KMGT".index(m.group(2))) if m else float(s)
rec = collections.defaultdict(list)
stall = collections.defaultdict(list)
for line in open(path):
    p = line.rstrip("\n").split("\t")
    if p[0] == "rec":
        _, run, bw, js, ddr, netr = p
        j = json.loads(js)
        j.update(run=run, dd=float(ddr), net=float(netr))
        rec[bw].append(j)
    else:
        _, run, how, gap, at, n, err, iops = p
        stall[how].append(dict(run=run, gap=int(gap), at=int(at), n=int(n), err=int(err), iops=float(iops)))
MiB = 1 << 20
med = statistics.median
print(f"Fabric at {rev}; {ncpu} CPUs, load average (1/5/15 min) {load0} at the start, {load1} at the end "
      f"(a shared machine: other builds and tests ran meanwhile). Four blockd hosts and volume-mgr in "
      f"namespaces on one bridge, all disks files on one file system; volume-mgr --down-after 2s "
      f"--out-after {out_after}. Medians of {runs} run(s), each on a fresh cluster.")
print()
print(f"### Recovery rate: {size} volume, 3 replicas, h3 killed for good")
print()
print("| --recovery-bandwidth | sets re-homed | copied | out decision -> all sets at 3 | rate | raw limit (min of dd, TCP) | rate / min(throttle, limit) | copy phase rate (first byte -> done) |")
print("|---|---|---|---|---|---|---|---|")
for bw, rs in rec.items():
    for j in rs:
        j["rate"] = j["copied"] / (j["t_done"] - j["t_out"])
        j["limit"] = min(j["dd"], j["net"])
        thr = bw_bytes(bw)
        j["ratio"] = j["rate"] / (min(thr, j["limit"]) if thr else j["limit"])
        first = j["t_first_log"] or j["t_first_poll"]
        j["copy_rate"] = j["copied"] / (j["t_done"] - first) if j["t_done"] > first else float("nan")
    print("| %s | %d | %.0f MiB | %.1f s | %.1f MiB/s | %.0f MiB/s (dd %.0f, TCP %.0f) | **%.2f** | %.1f MiB/s |" % (
        bw if bw != "0" else "0 (unlimited)", med(j["sets_on_victim"] for j in rs),
        med(j["copied"] for j in rs) / MiB, med(j["t_done"] - j["t_out"] for j in rs),
        med(j["rate"] for j in rs) / MiB, med(j["limit"] for j in rs) / MiB,
        med(j["dd"] for j in rs) / MiB, med(j["net"] for j in rs) / MiB,
        med(j["ratio"] for j in rs), med(j["copy_rate"] for j in rs) / MiB))
print()
print("### Detection to first byte copied (all runs above)")
print()
allr = [j for rs in rec.values() for j in rs]
def row(name, xs, note=""):
    xs = [x for x in xs if x is not None]
    if xs:
        print("| %s | %.2f s | %.2f-%.2f s | %s |" % (name, med(xs), min(xs), max(xs), note))
print("| interval | median | range | how it is measured |")
print("|---|---|---|---|")
row("kill -> out decision", [j["t_out"] - j["t_kill"] for j in allr], "GET /v1/recovery nodes_out, polled every 100 ms")
row("last heartbeat -> out decision", [j["t_out"] - j["hb"] for j in allr], "last_heartbeat_ms of GET /v1/nodes (down-after + out-after = 4 s)")
row("out decision -> copy starts (gateway log)", [j["t_first_log"] - j["t_out"] if j["t_first_log"] else None for j in allr], "timestamp of h1's log line 'new replica in the volume's record: copying to it'")
row("last heartbeat -> copy starts (gateway log)", [j["t_first_log"] - j["hb"] if j["t_first_log"] else None for j in allr], "")
row("out decision -> first bytes reported", [j["t_first_poll"] - j["t_out"] if j["t_first_poll"] else None for j in allr], "bytes_copied of GET /v1/recovery moves (blockd reports once a second: up to 1 s late)")
print()
print(f"### I/O stall when a replica host dies: fio 4k randwrite QD1 through h1, {ssize} volume, {stime} s, h3 dies 5 s in")
print()
print("| how h3 dies | longest gap between completed writes (median) | every run | write errors | IOPS over the run |")
print("|---|---|---|---|---|")
names = {"kill": "kill -9 its blockd", "cable": "its cable pulled (ip link set down)"}
for how, rs in stall.items():
    print("| %s | **%.2f s** | %s | %d | %.0f |" % (names[how], med(x["gap"] for x in rs) / 1000,
          ", ".join("%.2f s" % (x["gap"] / 1000) for x in rs), sum(x["err"] for x in rs), med(x["iops"] for x in rs)))
print()
print("Targets: recovery rate >= 0.5 of min(throttle, raw limit): %s; stall < 6 s: %s." % (
    ", ".join("%s %s (%.2f)" % (bw if bw != "0" else "unlimited",
                               "met" if med(j["ratio"] for j in rs) >= 0.5 else "NOT met",
                               med(j["ratio"] for j in rs)) for bw, rs in rec.items()),
    ", ".join("%s %s" % (how, "met" if med(x["gap"] for x in rs) < 6000 else "NOT met")
              for how, rs in stall.items())))
print()
print("Every recovery run (s from the kill: out decision, copy start in the log, first progress, done; MiB copied; MiB/s rate; dd and TCP MiB/s):")
print()
print("| bandwidth | run | out | copy starts | first progress | done | copied | rate | dd | TCP |")
print("|---|---|---|---|---|---|---|---|---|---|")
for bw, rs in rec.items():
    for j in rs:
        k = j["t_kill"]
        f = lambda x: "%.2f" % (x - k) if x else "-"
        print("| %s | %s | %s | %s | %s | %s | %.0f | %.1f | %.0f | %.0f |" % (bw, j["run"], f(j["t_out"]),
              f(j["t_first_log"]), f(j["t_first_poll"]), f(j["t_done"]), j["copied"] / MiB,
              j["rate"] / MiB, j["dd"] / MiB, j["net"] / MiB))
PY
echo
echo 'Commands (TAG, the run directory $RUN and the PIDs change from run to run):'
echo
echo '```sh'
cat "$CMDS"
echo '```'
} > "$OUT"
cat "$OUT"
echo "written to $OUT (total $(( $(date +%s) - START ))s)" >&2
