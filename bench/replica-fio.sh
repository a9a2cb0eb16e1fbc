#!/usr/bin/env bash
# Replication cost: fio (nbd engine) through the gateway on namespace host h1 against a
# 3-replica volume and a 1-replica volume of a 3-host cluster (volume-mgr in h0, blockd in
# h1..h3, one bridge in 198.18.0.0/24, no route out), against a single-host fabric (volume-mgr
# and one blockd alone in namespace h4), and fio io_uring --direct=1 on a raw file on the same
# file system (the disk's limit; all replicas share this one disk, so a 3-replica write can at
# best reach a third of it). Prints a markdown table of medians and ratios and the commands,
# and writes both to bench/results/replica-<date>.md.
#
#   bash bench/replica-fio.sh            # RUNS=3 RUNTIME=10: about 12 minutes
#   QUICK=1 bash bench/replica-fio.sh    # smoke run: 1 run x 3 s per cell
#
# Settings (environment): RUNS (3), RUNTIME seconds per run (10), RAMP (1), SIZE of each
# volume and of the raw file (2G), BENCH_DIR for the disk files (/work), NO_BUILD=1, KEEP=1
# (keep the daemons' logs).
# Cells are interleaved as in bench/nbd-fio.sh: every run goes through every workload, and the
# order of the targets rotates from run to run. Root is needed (ip netns).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${QUICK:-0}" = 1 ]; then
  RUNS=${RUNS:-1}
  RUNTIME=${RUNTIME:-3}
fi
RUNS=${RUNS:-3}
RUNTIME=${RUNTIME:-10}
RAMP=${RAMP:-1}
SIZE=${SIZE:-2G}
BENCH_DIR=${BENCH_DIR:-/work}

die() { echo "replica-fio: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root (it creates network namespaces)"
for t in fio ip python3 cargo; do
  command -v "$t" >/dev/null || die "'$t' is required but not installed"
done
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no 'nbd' ioengine (Debian's fio has it)"

TAG="frb$$"
WORK=""
PIDS=()
FIO_PID=""
cleanup() {
  local rc=$? p i
  set +e
  trap - EXIT INT TERM
  local all=($FIO_PID)
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do all+=("${PIDS[i]}"); done
  for p in "${all[@]}"; do
    kill "$p" 2>/dev/null
    for i in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null
    wait "$p" 2>/dev/null
  done
  for ns in $(ip netns list | awk '{print $1}' | grep "^$TAG-"); do ip netns del "$ns"; done
  if [ "${KEEP:-0}" = 1 ] && [ -n "$WORK" ]; then
    rm -f "$WORK"/h*/disk0.img "$WORK/raw.img"; echo "logs kept in $WORK" >&2
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
WORK=$(mktemp -d "$BENCH_DIR/fabric-rbench.XXXXXX")
BIN=$WORK/bin
mkdir -p "$BIN"
cp target/release/volume-mgr target/release/blockd target/release/fabctl "$BIN/"
CMDS=$WORK/commands.txt
: > "$CMDS"
logcmd() { printf '%q ' "$@" | sed 's/ $//' >> "$CMDS"; echo >> "$CMDS"; }
run() { logcmd "$@"; "$@"; }
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$WORK/secret"

# ---- namespaces: switch + h0 (manager) + h1..h3 (blockd) on a bridge; h4 alone ---------------
run ip netns add "$TAG-sw"
run ip -n "$TAG-sw" link add br0 type bridge
run ip -n "$TAG-sw" link set br0 up
for i in 0 1 2 3; do
  ns="$TAG-h$i"
  run ip netns add "$ns"
  run ip link add name eth0 netns "$ns" type veth peer name "p$i" netns "$TAG-sw"
  run ip -n "$TAG-sw" link set "p$i" master br0
  run ip -n "$TAG-sw" link set "p$i" up
  run ip -n "$ns" link set lo up
  run ip -n "$ns" addr add "198.18.0.$((i + 1))/24" dev eth0
  run ip -n "$ns" link set eth0 up
done
run ip netns add "$TAG-h4"
run ip -n "$TAG-h4" link set lo up
inns() { local ns=$1; shift; ip netns exec "$TAG-$ns" "$@"; }

wait_http() { # ns url log
  for i in $(seq 300); do inns "$1" "$BIN/fabctl" --manager "$2" node ls >/dev/null 2>&1 && return 0; sleep 0.1; done
  tail -20 "$3" >&2; die "volume-mgr at $2 did not answer"
}
nodes_up() { # ns url count
  inns "$1" "$BIN/fabctl" --manager "$2" node ls -o json 2>/dev/null | python3 -c '
import json, sys
n = json.load(sys.stdin)
sys.exit(0 if sum(1 for x in n if x.get("state") == "up") >= int(sys.argv[1]) else 1)' "$3"
}

MGR=http://198.18.0.1:7700
logcmd ip netns exec "$TAG-h0" "$BIN/volume-mgr" --listen 198.18.0.1:7700 --data-dir "$WORK/mgr"
ip netns exec "$TAG-h0" "$BIN/volume-mgr" --listen 198.18.0.1:7700 --data-dir "$WORK/mgr" >/dev/null 2>"$WORK/mgr.log" & PIDS+=($!)
wait_http h0 "$MGR" "$WORK/mgr.log"
for i in 1 2 3; do
  mkdir -p "$WORK/h$i"
  c=("$BIN/blockd" --manager "$MGR" --node "h$i" --listen "198.18.0.$((i + 1)):7800"
     --nbd-listen none --http-listen none --nbd-socket "$WORK/h$i/nbd.sock"
     --disk "$WORK/h$i/disk0.img:20G" --secret-file "$WORK/secret")
  logcmd ip netns exec "$TAG-h$i" "${c[@]}"
  ip netns exec "$TAG-h$i" "${c[@]}" >/dev/null 2>"$WORK/h$i.log" & PIDS+=($!)
done
for i in $(seq 300); do nodes_up h0 "$MGR" 3 && break; sleep 0.1; done
nodes_up h0 "$MGR" 3 || { tail -5 "$WORK"/h*.log >&2; die "the three blockd are not up"; }

# The single-host fabric: everything on h4's loopback.
SMGR=http://127.0.0.1:7700
mkdir -p "$WORK/h4"
logcmd ip netns exec "$TAG-h4" "$BIN/volume-mgr" --listen 127.0.0.1:7700 --data-dir "$WORK/smgr"
ip netns exec "$TAG-h4" "$BIN/volume-mgr" --listen 127.0.0.1:7700 --data-dir "$WORK/smgr" >/dev/null 2>"$WORK/smgr.log" & PIDS+=($!)
wait_http h4 "$SMGR" "$WORK/smgr.log"
c=("$BIN/blockd" --manager "$SMGR" --node single --listen 127.0.0.1:7800 --nbd-listen none
   --http-listen none --nbd-socket "$WORK/h4/nbd.sock" --disk "$WORK/h4/disk0.img:20G")
logcmd ip netns exec "$TAG-h4" "${c[@]}"
ip netns exec "$TAG-h4" "${c[@]}" >/dev/null 2>"$WORK/h4.log" & PIDS+=($!)
for i in $(seq 300); do nodes_up h4 "$SMGR" 1 && break; sleep 0.1; done
nodes_up h4 "$SMGR" 1 || { tail -5 "$WORK/h4.log" >&2; die "the single-host blockd is not up"; }

run ip netns exec "$TAG-h0" "$BIN/fabctl" --manager "$MGR" volume create r3 --size "$SIZE" --replicas 3 >/dev/null
run ip netns exec "$TAG-h0" "$BIN/fabctl" --manager "$MGR" volume create r1 --size "$SIZE" --replicas 1 >/dev/null
run ip netns exec "$TAG-h4" "$BIN/fabctl" --manager "$SMGR" volume create single --size "$SIZE" --replicas 1 >/dev/null
inns h0 "$BIN/fabctl" --manager "$MGR" volume show r1 > "$WORK/r1-placement.txt" || true
RAW=$WORK/raw.img
uri() { # target
  case $1 in
    r3) echo "nbd+unix:///r3?socket=$WORK/h1/nbd.sock" ;;
    r1) echo "nbd+unix:///r1?socket=$WORK/h1/nbd.sock" ;;
    single) echo "nbd+unix:///single?socket=$WORK/h4/nbd.sock" ;;
  esac
}

fio_bg() {
  local line
  line=$(printf '%q ' fio "$@" | sed -E 's/ $//; /--name=bench/s/--rw=[a-z]+ --bs=[0-9a-zA-Z]+ --iodepth=[0-9]+/--rw=$RW --bs=$BS --iodepth=$QD/')
  grep -qxF "$line" "$CMDS" || echo "$line" >> "$CMDS"
  fio "$@" & FIO_PID=$!
  local rc=0; wait $FIO_PID || rc=$?
  FIO_PID=""
  return $rc
}

echo "pre-filling r3, r1, single and the raw file ($SIZE each)..." >&2
for t in r3 r1 single; do
  fio_bg --name=fill --thread --rw=write --bs=1M --iodepth=8 --size="$SIZE" --output=/dev/null \
    --ioengine=nbd --uri="$(uri $t)"
done
truncate -s "$SIZE" "$RAW"
fio_bg --name=fill --rw=write --bs=1M --iodepth=8 --size="$SIZE" --output=/dev/null \
  --ioengine=io_uring --direct=1 --filename="$RAW"
sync

JOBS=("randwrite 4k 1" "randwrite 4k 32" "write 1M 8" "read 1M 8")
TARGETS=(r3 r1 single raw)
RESULTS=$WORK/results.tsv
: > "$RESULTS"
run_cell() { # run target rw bs qd
  local eng
  if [ "$2" = raw ]; then eng=(--ioengine=io_uring --direct=1 --filename="$RAW")
  else eng=(--ioengine=nbd --uri="$(uri "$2")"); fi
  fio_bg --name=bench --thread --rw="$3" --bs="$4" --iodepth="$5" --size="$SIZE" --time_based \
    --runtime="$RUNTIME" --ramp_time="$RAMP" --randrepeat=0 "${eng[@]}" \
    --output-format=json --output="$WORK/out.json"
  python3 - "$WORK/out.json" "$2" "$3" "$4" "$5" "$1" >> "$RESULTS" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
j = json.loads(text[text.index("{"):])["jobs"][0]  # fio's nbd engine may print a line first
s = j["read" if "read" in sys.argv[3] else "write"]
p = s["clat_ns"]["percentile"]
print("\t".join(sys.argv[2:]) + "\t%.1f\t%.1f\t%.1f\t%.1f" % (
    s["iops"], s["bw_bytes"] / 1e6, p["50.000000"] / 1e3, p["99.000000"] / 1e3))
PY
}

CELLS=$(( RUNS * ${#JOBS[@]} * ${#TARGETS[@]} ))
echo "running $CELLS cells ($RUNS runs x ${#JOBS[@]} workloads x ${#TARGETS[@]} targets, ${RUNTIME}s + ${RAMP}s ramp each)..." >&2
START=$(date +%s)
n=0
for r in $(seq "$RUNS"); do
  for job in "${JOBS[@]}"; do
    read -r rw bs qd <<<"$job"
    for k in $(seq 0 $(( ${#TARGETS[@]} - 1 ))); do
      t=${TARGETS[$(( (k + r - 1) % ${#TARGETS[@]} ))]}
      n=$((n + 1))
      printf '[%d/%d %ds] run %d %-9s %-2s QD%-2s %s\n' $n $CELLS $(( $(date +%s) - START )) "$r" "$rw" "$bs" "$qd" "$t" >&2
      run_cell "$r" "$t" "$rw" "$bs" "$qd"
    done
  done
done
for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null || die "a daemon exited during the run (logs in $WORK)"; done

mkdir -p bench/results
OUT="bench/results/replica-$(date +%Y-%m-%d-%H%M).md"
{
python3 - "$RESULTS" "$RUNS" "$RUNTIME" "$RAMP" "$SIZE" "$REV" <<'PY'
import sys, statistics, collections
_, path, runs, runtime, ramp, size, rev = sys.argv
rows = collections.defaultdict(list)
for line in open(path):
    t, rw, bs, qd, run, iops, mbs, p50, p99 = line.rstrip("\n").split("\t")
    rows[(t, rw, bs, qd)].append(tuple(map(float, (iops, mbs, p50, p99))))
med = {k: tuple(statistics.median(x[i] for x in v) for i in range(4)) for k, v in rows.items()}
def m(t, job, i):
    k = (t,) + job
    return med[k][i] if k in med else None
def ratio(a, b):
    return "%.2fx" % (a / b) if a and b else "-"
W1, W32, SW, SR = ("randwrite","4k","1"), ("randwrite","4k","32"), ("write","1M","8"), ("read","1M","8")
print(f"fio nbd engine through the gateway on namespace host h1 (unix socket); medians of {runs} run(s) x "
      f"{runtime} s (after {ramp} s ramp), {size} volumes, pre-filled. 3 blockd hosts + manager in "
      f"namespaces on one bridge; single-host = volume-mgr + one blockd alone in a namespace. "
      f"All disks are files on one file system. Fabric at {rev}.")
print()
print("| workload | 3 replicas | 1 replica (cluster) | single host | raw io_uring | 3 replicas / 1 replica | 3 replicas / single |")
print("|---|---|---|---|---|---|---|")
for job, i, unit, name in ((W1, 2, "µs", "4k randwrite QD1 p50"), (W1, 3, "µs", "4k randwrite QD1 p99"),
                           (W32, 0, "IOPS", "4k randwrite QD32"), (SW, 1, "MB/s", "1M write QD8"),
                           (SR, 1, "MB/s", "1M read QD8")):
    v = [m(t, job, i) for t in ("r3", "r1", "single", "raw")]
    cells = ["-" if x is None else "%.0f %s" % (x, unit) for x in v]
    print(f"| {name} | " + " | ".join(cells) + f" | **{ratio(v[0], v[1])}** | **{ratio(v[0], v[2])}** |")
print()
raw_w = m("raw", SW, 1); r3_w = m("r3", SW, 1)
print("Targets: 1M write on 3 replicas >= 0.8 of raw/3: %s (%.0f vs raw/3 = %.0f MB/s); "
      "4k QD1 p50 on 3 replicas <= 2x the 1-replica latency: %s; 1M read on 3 replicas >= 0.9x "
      "the 1-replica reads: %s (%s of single host)." % (
      ratio(r3_w, raw_w / 3) if r3_w and raw_w else "-", r3_w or 0, (raw_w or 0) / 3,
      ratio(m("r3", W1, 2), m("r1", W1, 2)), ratio(m("r3", SR, 1), m("r1", SR, 1)),
      ratio(m("r3", SR, 1), m("single", SR, 1))))
print()
print("Every run (IOPS, MB/s, p50 µs, p99 µs):")
print()
print("| workload | target | runs |")
print("|---|---|---|")
for job in (W1, W32, SW, SR):
    for t in ("r3", "r1", "single", "raw"):
        v = rows.get((t,) + job, [])
        print(f"| {' '.join(job)} | {t} | " + "; ".join("%.0f, %.0f, %.0f, %.0f" % x for x in v) + " |")
PY
echo
echo "Placement of the 1-replica volume (its chunk sets spread over the three hosts):"
echo
echo '```'
cat "$WORK/r1-placement.txt"
echo '```'
echo
echo "Commands (TAG, the temp dir and the secret change from run to run; the fio lines run for"
echo "every RW BS QD in: ${JOBS[*]/%/,}):" | sed 's/,$//; s/,)/)/'
echo
echo '```sh'
cat "$CMDS"
echo '```'
} > "$OUT"
cat "$OUT"
echo "written to $OUT (total $(( $(date +%s) - START ))s of measuring)" >&2
