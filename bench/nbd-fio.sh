#!/usr/bin/env bash
# fio (nbd engine) against blockd and against qemu-nbd serving a raw file on the same file
# system, over TCP and the unix socket, plus fio io_uring with O_DIRECT straight on the raw
# file (the limit). Prints a markdown table of medians and ratios, the exact commands used,
# and writes both to bench/results/<date>.md.
#
#   bash bench/nbd-fio.sh                 # RUNS=3 RUNTIME=10: about 20 minutes
#   QUICK=1 bash bench/nbd-fio.sh         # smoke run: 1 run x 3 s per cell
#
# Settings (environment): RUNS (3), RUNTIME seconds per run (10), RAMP seconds before
# measuring (1), SIZE of the volume and the raw file (4G), BENCH_DIR where the blockd disk
# and the raw file live (/work; both must be on the same file system), QUICK=1 (RUNS=1
# RUNTIME=3 unless set), NO_BUILD=1 (skip cargo build).
#
# Cells are interleaved: every run goes through every workload, and within a workload through
# every target in an order that rotates from run to run, so drift on a noisy machine hits all
# targets alike. qemu-nbd cannot serve TCP and a unix socket from one process, and two
# writable qemu-nbd processes on one image conflict (image locking), so a fresh qemu-nbd is
# started for each qemu-nbd cell and stopped after it; every qemu-nbd serves the same file.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

if [ "${QUICK:-0}" = 1 ]; then
  RUNS=${RUNS:-1}
  RUNTIME=${RUNTIME:-3}
fi
RUNS=${RUNS:-3}
RUNTIME=${RUNTIME:-10}
RAMP=${RAMP:-1}
SIZE=${SIZE:-4G}
BENCH_DIR=${BENCH_DIR:-/work}
DISK_SIZE=${DISK_SIZE:-20G}

die() { echo "nbd-fio: $*" >&2; exit 1; }
for t in fio qemu-nbd python3 curl cargo; do
  command -v "$t" >/dev/null || die "'$t' is required but not installed (fio with its nbd engine, qemu-nbd from qemu-utils)"
done
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio ($(fio --version)) has no 'nbd' ioengine (Debian: install fio built with libnbd)"
fio --enghelp=io_uring >/dev/null 2>&1 || die "this fio has no 'io_uring' ioengine"
HAVE_NBDINFO=0; command -v nbdinfo >/dev/null && HAVE_NBDINFO=1

WORK=""
PIDS=()     # long-lived: volume-mgr, blockd, the RSS sampler (in start order)
FIO_PID=""  # the fio running now, if any
QPID=""     # the qemu-nbd running now, if any
cleanup() {
  local rc=$? p i
  set +e
  trap - EXIT INT TERM
  # fio and qemu-nbd first, then the others in reverse start order (blockd before volume-mgr).
  local all=($FIO_PID $QPID)
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do all+=("${PIDS[i]}"); done
  for p in "${all[@]}"; do
    kill "$p" 2>/dev/null
    for i in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null
    wait "$p" 2>/dev/null
  done
  [ -n "$WORK" ] && rm -rf "$WORK"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- build -------------------------------------------------------------------------------
if [ "${NO_BUILD:-0}" != 1 ]; then
  echo "building release binaries..." >&2
  cargo build --release -q -p blockd -p volume-mgr -p tools
fi
for b in volume-mgr blockd fabctl; do
  [ -x "target/release/$b" ] || die "target/release/$b is missing (build failed?)"
done
REV="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
git diff --quiet HEAD -- blockd volume-mgr tools 2>/dev/null || REV="$REV + uncommitted changes"

mkdir -p "$BENCH_DIR"
WORK=$(mktemp -d "$BENCH_DIR/fabric-bench.XXXXXX")
# Copies of the binaries, so that a rebuild by someone else during the run changes nothing.
BIN=$WORK/bin
mkdir -p "$BIN"
cp target/release/volume-mgr target/release/blockd target/release/fabctl "$BIN/"
CMDS=$WORK/commands.txt
: > "$CMDS"
# Logs a command line (once) to the commands list, then runs it.
logcmd() { printf '%q ' "$@" | sed 's/ $//' >> "$CMDS"; echo >> "$CMDS"; }
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
MP=$(port); RP=$(port); NP=$(port); HP=$(port); QP=$(port)
MGR=http://127.0.0.1:$MP
BSOCK=$WORK/blockd.sock
QSOCK=$WORK/qemu-nbd.sock
RAW=$WORK/raw.img

# ---- volume-mgr + blockd -----------------------------------------------------------------
cmd=("$BIN/volume-mgr" --listen "127.0.0.1:$MP" --data-dir "$WORK/mgr")
logcmd "${cmd[@]}"
"${cmd[@]}" 2>"$WORK/volume-mgr.log" & PIDS+=($!)
for i in $(seq 300); do curl -sf "$MGR/healthz" >/dev/null && break; sleep 0.1; done
curl -sf "$MGR/healthz" >/dev/null || { tail -20 "$WORK/volume-mgr.log" >&2; die "volume-mgr did not answer /healthz"; }

cmd=("$BIN/blockd" --manager "$MGR" --node bench --listen "127.0.0.1:$RP" --nbd-listen "127.0.0.1:$NP"
  --nbd-socket "$BSOCK" --http-listen "127.0.0.1:$HP" --disk "$WORK/disk0.img:$DISK_SIZE")
logcmd "${cmd[@]}"
"${cmd[@]}" 2>"$WORK/blockd.log" & BLOCKD=$!; PIDS+=($BLOCKD)
node_up() {
  "$BIN/fabctl" --manager "$MGR" node ls -o json 2>/dev/null | python3 -c '
import json, sys
d = json.load(sys.stdin)
nodes = d if isinstance(d, list) else d.get("nodes", d.get("items", []))
sys.exit(0 if any(n.get("name") == "bench" and str(n.get("state", n.get("status", "up"))).lower() == "up" for n in nodes) else 1)'
}
for i in $(seq 300); do node_up && break; kill -0 $BLOCKD 2>/dev/null || break; sleep 0.1; done
node_up || { tail -20 "$WORK/blockd.log" >&2; die "blockd node 'bench' not listed as up by fabctl node ls"; }
logcmd "$BIN/fabctl" --manager "$MGR" node ls -o json

cmd=("$BIN/fabctl" --manager "$MGR" volume create bench --size "$SIZE" --replicas 1)
logcmd "${cmd[@]}"
"${cmd[@]}" >/dev/null
BURI_TCP="nbd://127.0.0.1:$NP/bench"
BURI_UNIX="nbd+unix:///bench?socket=$BSOCK"
for i in $(seq 100); do [ -S "$BSOCK" ] && break; sleep 0.1; done

# blockd resident memory, sampled every second for the whole run (VmHWM is the kernel's peak).
RSS_LOG=$WORK/rss.log
( s=""; trap '[ -n "$s" ] && kill $s 2>/dev/null; exit 0' TERM
  while kill -0 $BLOCKD 2>/dev/null; do
    awk '/VmRSS/{print $2}' /proc/$BLOCKD/status 2>/dev/null || true
    sleep 1 & s=$!; wait $s; s=""
  done ) > "$RSS_LOG" & PIDS+=($!)

# ---- qemu-nbd ----------------------------------------------------------------------------
QAIO=io_uring
truncate -s 64M "$WORK/probe.img"
qemu-nbd --cache=none --aio=io_uring --format=raw -k "$WORK/probe.sock" "$WORK/probe.img" 2>"$WORK/probe.log" &
QPID=$!
sleep 0.5
if ! kill -0 $QPID 2>/dev/null; then
  QAIO=native
  echo "nbd-fio: this qemu-nbd does not accept --aio=io_uring ($(head -1 "$WORK/probe.log")); using --aio=native" >&2
fi
kill $QPID 2>/dev/null || true; wait $QPID 2>/dev/null || true; QPID=""
rm -f "$WORK/probe.img" "$WORK/probe.sock"
QEMU_NBD=(qemu-nbd --cache=none --aio=$QAIO --format=raw --persistent --shared=8 -x bench)
qnbd_start() { # tcp|unix
  local c
  if [ "$1" = tcp ]; then c=("${QEMU_NBD[@]}" -b 127.0.0.1 -p "$QP" "$RAW"); QURI="nbd://127.0.0.1:$QP/bench"
  else c=("${QEMU_NBD[@]}" -k "$QSOCK" "$RAW"); QURI="nbd+unix:///bench?socket=$QSOCK"; fi
  grep -qxF "$(printf '%q ' "${c[@]}" | sed 's/ $//')" "$CMDS" || logcmd "${c[@]}"
  "${c[@]}" 2>>"$WORK/qemu-nbd.log" & QPID=$!
  for i in $(seq 100); do
    if [ $HAVE_NBDINFO = 1 ]; then nbdinfo --size "$QURI" >/dev/null 2>&1 && return 0
    elif [ "$1" = unix ]; then [ -S "$QSOCK" ] && return 0
    else (exec 3<>/dev/tcp/127.0.0.1/$QP) 2>/dev/null && return 0; fi
    kill -0 $QPID 2>/dev/null || break
    sleep 0.05
  done
  tail -5 "$WORK/qemu-nbd.log" >&2; die "qemu-nbd ($1) did not start"
}
qnbd_stop() { kill $QPID 2>/dev/null || true; wait $QPID 2>/dev/null || true; QPID=""; rm -f "$QSOCK"; }

# ---- fio ---------------------------------------------------------------------------------
# Runs fio in the background (so a signal reaches the trap at once) and waits for it.
# The commands list shows each fio line once per target, with the workload as variables.
fio_bg() {
  local line
  line=$(printf '%q ' fio "$@" | sed -E 's/ $//; /--name=bench/s/--rw=[a-z]+ --bs=[0-9a-zA-Z]+ --iodepth=[0-9]+/--rw=$RW --bs=$BS --iodepth=$QD/')
  grep -qxF "$line" "$CMDS" || echo "$line" >> "$CMDS"
  fio "$@" & FIO_PID=$!
  local rc=0; wait $FIO_PID || rc=$?
  FIO_PID=""
  return $rc
}
fill() { fio_bg --name=fill --rw=write --bs=1M --iodepth=8 --size="$SIZE" --output=/dev/null "$@"; }

echo "pre-filling the blockd volume and the raw file ($SIZE each, sequential 1M writes)..." >&2
truncate -s "$SIZE" "$RAW"
fill --ioengine=nbd --uri="$BURI_TCP"
fill --ioengine=io_uring --direct=1 --filename="$RAW"
sync

JOBS=("randread 4k 1" "randread 4k 32" "randwrite 4k 1" "randwrite 4k 32" "read 1M 8" "write 1M 8")
TARGETS=("blockd tcp" "qemu-nbd tcp" "blockd unix" "qemu-nbd unix" "raw file")
RESULTS=$WORK/results.tsv
: > "$RESULTS"

run_cell() { # run target transport rw bs qd
  local run=$1 target=$2 tr=$3 rw=$4 bs=$5 qd=$6 eng
  case "$target/$tr" in
    blockd/tcp) eng=(--ioengine=nbd --uri="$BURI_TCP") ;;
    blockd/unix) eng=(--ioengine=nbd --uri="$BURI_UNIX") ;;
    qemu-nbd/*) qnbd_start "$tr"; eng=(--ioengine=nbd --uri="$QURI") ;;
    raw/file) eng=(--ioengine=io_uring --direct=1 --filename="$RAW") ;;
  esac
  fio_bg --name=bench --rw="$rw" --bs="$bs" --iodepth="$qd" --size="$SIZE" --time_based \
    --runtime="$RUNTIME" --ramp_time="$RAMP" --randrepeat=0 "${eng[@]}" \
    --output-format=json --output="$WORK/out.json"
  if [ "$target" = qemu-nbd ]; then qnbd_stop; fi
  python3 - "$WORK/out.json" "$target" "$tr" "$rw" "$bs" "$qd" "$run" >> "$RESULTS" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
j = json.loads(text[text.index("{"):])["jobs"][0]  # fio's nbd engine may print a line first
side = "read" if "read" in sys.argv[4] else "write"
s = j[side]
print("\t".join(sys.argv[2:]) + "\t%.1f\t%.1f\t%.1f" % (s["iops"], s["bw_bytes"] / 1e6, s["clat_ns"]["mean"] / 1e3))
PY
  return 0
}

CELLS=$(( RUNS * ${#JOBS[@]} * ${#TARGETS[@]} ))
echo "running $CELLS cells ($RUNS runs x ${#JOBS[@]} workloads x ${#TARGETS[@]} targets, ${RUNTIME}s + ${RAMP}s ramp each)..." >&2
START=$(date +%s)
n=0
for run in $(seq "$RUNS"); do
  for job in "${JOBS[@]}"; do
    read -r rw bs qd <<<"$job"
    for k in $(seq 0 $(( ${#TARGETS[@]} - 1 ))); do
      read -r target tr <<<"${TARGETS[$(( (k + run - 1) % ${#TARGETS[@]} ))]}"
      n=$((n + 1))
      printf '[%d/%d %ds] run %d %-9s %-2s QD%-2s %-8s %s\n' $n $CELLS $(( $(date +%s) - START )) \
        "$run" "$rw" "$bs" "$qd" "$target" "$tr" >&2
      run_cell "$run" "$target" "$tr" "$rw" "$bs" "$qd"
    done
  done
done
kill -0 $BLOCKD 2>/dev/null || { tail -20 "$WORK/blockd.log" >&2; die "blockd exited during the run"; }
HWM=$(awk '/VmHWM/{print $2}' /proc/$BLOCKD/status)
RSS_MAX=$(sort -n "$RSS_LOG" | tail -1)

# ---- report ------------------------------------------------------------------------------
mkdir -p bench/results
OUT="bench/results/$(date +%Y-%m-%d-%H%M).md"
{
python3 - "$RESULTS" "$RUNS" "$RUNTIME" "$RAMP" "$SIZE" "$RSS_MAX" "$HWM" "$QAIO" "$REV" <<'PY'
import sys, statistics, collections
_, path, runs, runtime, ramp, size, rss_max, hwm, qaio, rev = sys.argv
rows = collections.defaultdict(list)
for line in open(path):
    t, tr, rw, bs, qd, run, iops, mbs, lat = line.rstrip("\n").split("\t")
    rows[(t, tr, rw, bs, qd)].append((float(iops), float(mbs), float(lat)))
med = {k: tuple(statistics.median(x[i] for x in v) for i in range(3)) for k, v in rows.items()}
JOBS = [("randread","4k","1"),("randread","4k","32"),("randwrite","4k","1"),("randwrite","4k","32"),("read","1M","8"),("write","1M","8")]
def val(k, idx):
    return med[k][idx] if k in med else None
def fmt(v, big):
    if v is None: return "-"
    return "%.0f MB/s" % v if big else "%.0f IOPS" % v
print(f"blockd vs qemu-nbd (--cache=none --aio={qaio}) vs fio io_uring --direct=1 on the raw file; "
      f"fio nbd engine. Medians of {runs} run(s) x {runtime} s (after {ramp} s ramp), {size} volume / file, both pre-filled. "
      f"Fabric at {rev}.")
print()
print("| workload | transport | blockd | qemu-nbd | blockd / qemu-nbd | raw io_uring (limit) | blockd % of limit | qemu-nbd % of limit |")
print("|---|---|---|---|---|---|---|---|")
for rw, bs, qd in JOBS:
    big = bs == "1M"; idx = 1 if big else 0
    raw = val(("raw","file",rw,bs,qd), idx)
    for tr in ("tcp","unix"):
        b = val(("blockd",tr,rw,bs,qd), idx); q = val(("qemu-nbd",tr,rw,bs,qd), idx)
        ratio = "%.2fx" % (b / q) if b and q else "-"
        bl = "%.0f%%" % (100 * b / raw) if b and raw else "-"
        ql = "%.0f%%" % (100 * q / raw) if q and raw else "-"
        print(f"| {rw} {bs} QD{qd} | {tr} | {fmt(b,big)} | {fmt(q,big)} | **{ratio}** | {fmt(raw,big)} | {bl} | {ql} |")
print()
print(f"blockd resident memory: max {int(rss_max)//1024} MiB sampled every second (VmRSS), peak {int(hwm)//1024} MiB (VmHWM), over the whole run including the pre-fill.")
print()
print("Mean completion latency (µs, medians):")
print()
print("| workload | blockd tcp | qemu-nbd tcp | blockd unix | qemu-nbd unix | raw |")
print("|---|---|---|---|---|---|")
for rw, bs, qd in JOBS:
    c = [val((t,tr,rw,bs,qd), 2) for t, tr in (("blockd","tcp"),("qemu-nbd","tcp"),("blockd","unix"),("qemu-nbd","unix"),("raw","file"))]
    print(f"| {rw} {bs} QD{qd} | " + " | ".join("-" if v is None else "%.0f" % v for v in c) + " |")
print()
print("Every run (IOPS for 4k, MB/s for 1M):")
print()
print("| workload | target | runs |")
print("|---|---|---|")
for rw, bs, qd in JOBS:
    big = bs == "1M"; idx = 1 if big else 0
    for t, tr in (("blockd","tcp"),("qemu-nbd","tcp"),("blockd","unix"),("qemu-nbd","unix"),("raw","file")):
        v = rows.get((t,tr,rw,bs,qd), [])
        print(f"| {rw} {bs} QD{qd} | {t} {tr} | " + ", ".join("%.0f" % x[idx] for x in v) + " |")
PY
echo
echo "Commands (the temp dir and the ports change from run to run; the fio lines run for every"
echo "RW BS QD in: ${JOBS[*]/%/,}):" | sed 's/,$//; s/,)/)/'
echo
echo '```sh'
cat "$CMDS"
echo '```'
} > "$OUT"
cat "$OUT"
echo "written to $OUT (total $(( $(date +%s) - START ))s of measuring)" >&2
