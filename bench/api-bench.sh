#!/usr/bin/env bash
# Control-plane API speed (issue 8 "Speed"): volume-mgr on the embedded store (redb) vs on a
# real 3-member etcd cluster on loopback, with the release binaries, through the real client
# library and the real CLI. tests/examples/api_bench.rs does the work (see its header): per run
# a fresh manager and store, 10,000 volume creates and 1,000 port creates by 4 concurrent
# clients, 5,000 random gets, 20 lists, `fabctl [-o json] volume ls` x 5 each as processes,
# then watch delivery (20 creates/s for 10 s) through GET /v1/watch and through the old
# whole-list long-poll GET /v1/volumes?after_revision=R. Runs alternate between the stores.
# Prints a markdown report of medians, ratios (etcd / embedded) and run-by-run values, and
# writes it with the command, the commit and the machine's load to
# bench/results/api-<date>.md.
#
#   bash bench/api-bench.sh            # RUNS=3: about 6-10 minutes on the shared 2-core box
#   QUICK=1 bash bench/api-bench.sh    # smoke run: 1 run, 2,000 volumes, 200 ports, 5 s watches
#
# Settings (environment): RUNS (3), VOLUMES (10000), PORTS (1000), CLIENTS (4), GETS (5000),
# LISTS (20), CLI_RUNS (5), WATCH_RATE (20), WATCH_SECS (10), STORES (embedded,etcd),
# EMBEDDED_DIR (/dev/shm: the redb file on tmpfs like the etcd members' data, so neither pays
# for fsync; set a disk directory to include it), NO_BUILD=1.
# Needs etcd and etcdctl (apt-get install etcd-server etcd-client); no root, no namespaces:
# everything listens on 127.0.0.1 ports.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${QUICK:-0}" = 1 ]; then
  RUNS=${RUNS:-1}
  VOLUMES=${VOLUMES:-2000}
  PORTS=${PORTS:-200}
  GETS=${GETS:-2000}
  WATCH_SECS=${WATCH_SECS:-5}
fi
RUNS=${RUNS:-3}
VOLUMES=${VOLUMES:-10000}
PORTS=${PORTS:-1000}
CLIENTS=${CLIENTS:-4}
GETS=${GETS:-5000}
LISTS=${LISTS:-20}
CLI_RUNS=${CLI_RUNS:-5}
WATCH_RATE=${WATCH_RATE:-20}
WATCH_SECS=${WATCH_SECS:-10}
STORES=${STORES:-embedded,etcd}
EMBEDDED_DIR=${EMBEDDED_DIR:-/dev/shm}
TARGET=${CARGO_TARGET_DIR:-target}

die() { echo "api-bench: $*" >&2; exit 1; }
for t in cargo etcd etcdctl; do
  command -v "$t" >/dev/null || die "'$t' is required but not installed"
done
[ -d "$EMBEDDED_DIR" ] || die "EMBEDDED_DIR $EMBEDDED_DIR is not a directory"

BENCH_PID=""
TMP=""
cleanup() {
  local rc=$? i
  set +e
  trap - EXIT INT TERM
  if [ -n "$BENCH_PID" ] && kill -0 "$BENCH_PID" 2>/dev/null; then
    # api_bench kills its daemons and removes its temp dirs on SIGTERM.
    kill -TERM "$BENCH_PID"
    for i in $(seq 100); do kill -0 "$BENCH_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$BENCH_PID" 2>/dev/null
    wait "$BENCH_PID" 2>/dev/null
  fi
  [ -n "$TMP" ] && rm -f "$TMP"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ "${NO_BUILD:-0}" != 1 ]; then
  echo "building release binaries..." >&2
  cargo build --release -q -p volume-mgr -p tools
  cargo build --release -q -p fabric-tests --example api_bench
fi
BENCH="$TARGET/release/examples/api_bench"
[ -x "$BENCH" ] || die "$BENCH is missing (build it, or unset NO_BUILD)"
REV="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
git diff --quiet HEAD -- volume-mgr tools tests 2>/dev/null || REV="$REV + uncommitted changes"

ARGS=(--stores "$STORES" --runs "$RUNS" --volumes "$VOLUMES" --ports "$PORTS"
  --clients "$CLIENTS" --gets "$GETS" --lists "$LISTS" --cli-runs "$CLI_RUNS"
  --watch-rate "$WATCH_RATE" --watch-secs "$WATCH_SECS" --bin-dir "$TARGET/release"
  --embedded-dir "$EMBEDDED_DIR")
CMD="cargo run --release -p fabric-tests --example api_bench -- $(printf '%q ' "${ARGS[@]}" | sed 's/ $//')"

mkdir -p bench/results
OUT="bench/results/api-$(date +%Y-%m-%d-%H%M).md"
TMP=$(mktemp)
LOAD_BEFORE=$(uptime)
START=$(date +%s)
"$BENCH" "${ARGS[@]}" > "$TMP" &
BENCH_PID=$!
wait "$BENCH_PID"
BENCH_PID=""
LOAD_AFTER=$(uptime)
{
  echo "# volume-mgr API: embedded store vs 3-member etcd ($(date '+%Y-%m-%d %H:%M'))"
  echo
  echo "Fabric at $REV; $(etcd --version 2>/dev/null | head -1); $(nproc) CPUs, shared with other builds."
  echo "Release volume-mgr (\`--default-replicas 1\`, one node registered with a 1 PiB disk) started"
  echo "fresh for every run; embedded = redb in a temp dir under $EMBEDDED_DIR; etcd = 3 members on"
  echo "loopback, data on /dev/shm. Ratios are etcd / embedded (for rates above 1 is faster, for"
  echo "latencies and CPU above 1 is slower). Whole benchmark: $(( $(date +%s) - START )) s."
  echo
  echo "- load before: $LOAD_BEFORE"
  echo "- load after:  $LOAD_AFTER"
  echo
  echo '```sh'
  echo "$CMD"
  echo '```'
  echo
  cat "$TMP"
} > "$OUT"
cat "$OUT"
echo "written to $OUT" >&2
