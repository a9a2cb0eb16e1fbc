#!/usr/bin/env bash
# fio (nbd engine) against blockd and against qemu-nbd serving a raw file on the same file
# system, over TCP and the unix socket, plus fio io_uring directly on the file (the limit).
# Prints a markdown table of medians and ratios and writes it to bench/results/.
#
#   bash bench/nbd-fio.sh            # RUNS=3 RUNTIME=10 by default
#   RUNS=1 RUNTIME=3 bash bench/nbd-fio.sh   # smoke run
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
RUNTIME=${RUNTIME:-10}
SIZE=${SIZE:-2G}
for t in fio qemu-nbd python3 curl; do
  command -v $t >/dev/null || { echo "bench: $t is required" >&2; exit 1; }
done
cargo build --release -q -p blockd -p volume-mgr -p tools
BIN=target/release
WORK=$(mktemp -d "${BENCH_DIR:-/work}/fabric-bench.XXXXXX")
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
MP=$(port); NP=$(port); QP=$(port); HP=$(port)
MGR=http://127.0.0.1:$MP

$BIN/volume-mgr --listen 127.0.0.1:$MP --data-dir "$WORK/mgr" 2>"$WORK/mgr.log" & PIDS+=($!)
until curl -sf $MGR/healthz >/dev/null; do sleep 0.1; done
$BIN/blockd --manager $MGR --node bench --listen 127.0.0.1:$(port) --nbd-listen 127.0.0.1:$NP \
  --nbd-socket "$WORK/blockd.sock" --http-listen 127.0.0.1:$HP --disk "$WORK/disk0.img:$((2 * ${SIZE%G} + 4))G" 2>"$WORK/blockd.log" & BLOCKD=$!; PIDS+=($BLOCKD)
until $BIN/fabctl --manager $MGR -o json node ls 2>/dev/null | grep -q '"up"'; do sleep 0.1; done
$BIN/fabctl --manager $MGR volume create bench --size $SIZE >/dev/null

RAW="$WORK/raw.img"
truncate -s $SIZE "$RAW"
fill() { fio --name=fill --ioengine="$1" "${@:2}" --rw=write --bs=1M --iodepth=8 --size=$SIZE --output=/dev/null; }
echo "filling volume and raw file ($SIZE each)..." >&2
fill nbd --uri="nbd://127.0.0.1:$NP/bench"
fill io_uring --direct=1 --filename="$RAW"

JOBS=("randread 4k 1" "randread 4k 32" "randwrite 4k 1" "randwrite 4k 32" "read 1M 8" "write 1M 8")
RESULTS="$WORK/results.tsv"
: > "$RESULTS"

run_fio() { # target transport rw bs qd -- engine args...
  local target=$1 tr=$2 rw=$3 bs=$4 qd=$5; shift 5
  for i in $(seq "$RUNS"); do
    fio --name=b --rw=$rw --bs=$bs --iodepth=$qd --size=$SIZE --time_based --runtime=$RUNTIME \
        --ramp_time=1 --randrepeat=0 --output-format=json "$@" > "$WORK/out.json"
    python3 - "$WORK/out.json" "$target" "$tr" "$rw" "$bs" "$qd" >> "$RESULTS" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
j = json.loads(text[text.index("{"):])["jobs"][0]  # fio's nbd engine prints a line first
side = "read" if "read" in sys.argv[4] else "write"
print("\t".join(sys.argv[2:]) + "\t%.1f\t%.1f" % (j[side]["iops"], j[side]["bw_bytes"] / 1e6))
PY
  done
}

RSS_MAX=0
sample_rss() { local r; r=$(awk '/VmRSS/{print $2}' /proc/$BLOCKD/status); [ "$r" -gt "$RSS_MAX" ] && RSS_MAX=$r; true; }

for job in "${JOBS[@]}"; do
  set -- $job
  echo "== $1 $2 QD$3" >&2
  run_fio blockd tcp "$1" "$2" "$3" --ioengine=nbd --uri="nbd://127.0.0.1:$NP/bench"; sample_rss
  run_fio blockd unix "$1" "$2" "$3" --ioengine=nbd --uri="nbd+unix:///bench?socket=$WORK/blockd.sock"; sample_rss
  run_fio raw file "$1" "$2" "$3" --ioengine=io_uring --direct=1 --filename="$RAW"
done
# qemu-nbd: one process per transport, serving the same raw file.
qemu-nbd --cache=none --aio=io_uring --format=raw --persistent --shared=8 -b 127.0.0.1 -p $QP -x bench "$RAW" 2>"$WORK/qnbd.log" & Q=$!; PIDS+=($Q)
sleep 1
for job in "${JOBS[@]}"; do set -- $job; echo "== qemu-nbd tcp $1 $2 QD$3" >&2
  run_fio qemu-nbd tcp "$1" "$2" "$3" --ioengine=nbd --uri="nbd://127.0.0.1:$QP/bench"; done
kill $Q; wait $Q 2>/dev/null || true
qemu-nbd --cache=none --aio=io_uring --format=raw --persistent --shared=8 -k "$WORK/q.sock" -x bench "$RAW" 2>>"$WORK/qnbd.log" & Q=$!; PIDS+=($Q)
sleep 1
for job in "${JOBS[@]}"; do set -- $job; echo "== qemu-nbd unix $1 $2 QD$3" >&2
  run_fio qemu-nbd unix "$1" "$2" "$3" --ioengine=nbd --uri="nbd+unix:///bench?socket=$WORK/q.sock"; done
sample_rss

mkdir -p bench/results
OUT="bench/results/$(date +%Y-%m-%d-%H%M).md"
python3 - "$RESULTS" "$RUNS" "$RUNTIME" "$SIZE" "$RSS_MAX" > "$OUT" <<'PY'
import sys, statistics, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    t, tr, rw, bs, qd, iops, mbs = line.split("\t")
    rows[(t, tr, rw, bs, qd)].append((float(iops), float(mbs)))
med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for k, v in rows.items()}
def fmt(k, big):
    if k not in med: return "-"
    i, m = med[k]
    return "%.0f MB/s" % m if big else "%.0f IOPS" % i
print("| workload | transport | blockd | qemu-nbd | blockd / qemu-nbd | raw io_uring (limit) | blockd / limit |")
print("|---|---|---|---|---|---|---|")
for rw, bs, qd in [("randread","4k","1"),("randread","4k","32"),("randwrite","4k","1"),("randwrite","4k","32"),("read","1M","8"),("write","1M","8")]:
    big = bs == "1M"
    idx = 1 if big else 0
    raw = med.get(("raw","file",rw,bs,qd))
    for tr in ("tcp","unix"):
        b = med.get(("blockd",tr,rw,bs,qd)); q = med.get(("qemu-nbd",tr,rw,bs,qd))
        ratio = "%.2fx" % (b[idx]/q[idx]) if b and q and q[idx] else "-"
        lim = "%.0f%%" % (100*b[idx]/raw[idx]) if b and raw and raw[idx] else "-"
        print(f"| {rw} {bs} QD{qd} | {tr} | {fmt(('blockd',tr,rw,bs,qd),big)} | {fmt(('qemu-nbd',tr,rw,bs,qd),big)} | {ratio} | {fmt(('raw','file',rw,bs,qd),big)} | {lim} |")
print()
print(f"Medians of {sys.argv[2]} runs x {sys.argv[3]} s (after 1 s ramp), {sys.argv[4]} volume / file, both pre-filled. blockd max RSS during the run: {int(sys.argv[5])//1024} MiB.")
PY
cat "$OUT"
echo "written to $OUT" >&2
