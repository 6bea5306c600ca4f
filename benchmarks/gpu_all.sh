#!/usr/bin/env bash
# One short run on a machine with an NVIDIA GPU (sized for about 9 minutes on an H200 with 16
# cores). Three phases, most valuable first:
#   1. build the CUDA extension (a CPU-only one if that fails: the Triton half can still be tested);
#   2. correctness, in parallel (none of it is timed): the Triton and native GPU tests in three
#      pytest runs, and compute-sanitizer (memcheck, racecheck, ...) over benchmarks/sanitize.py,
#      each sanitizer run started only while the phase's window has room;
#   3. benchmarks, alone on the machine: attention, the other kernels (fused cross-entropy first),
#      training throughput, end-to-end latency (each benchmark's JSON rewritten as cases finish, so a
#      stage cut short keeps what it measured).
# Budget: every stage runs under `timeout` within the overall budget (BUDGET_S, default 540 s; give the
# caller's own limit about a minute more) and writes its log to logs/<stage>.log as it goes. Build and info
# come first, with their own limits; then the correctness window, CHECK_WINDOW_S (default 130 s) or less:
# never more than what is left less the benchmark groups' floors (BENCH_FLOOR below, plus the deliveries),
# so that a slow build shortens the window rather than the benchmarks. The benchmarks share what is left,
# each group keeping back the floors of the groups after it, so that a slow build shortens attention and
# the kernels down to their floors, not e2e's target rows (7B, 5 actions, 256 px, then the 256 px frame:
# the latency targets; E2E_MIN_S, default 120 s). Each benchmark writes its JSON (device, versions, commit,
# date, load average, L2 size and rotated input sets inside) as it goes. The last lines printed are a
# summary table.
#   bash benchmarks/gpu_all.sh [--quick]        results and logs in benchmarks/results/
#   OUT=/some/dir bash benchmarks/gpu_all.sh    the work happens in WORK (default /tmp/worldvla_gpu_all)
# Files in OUT, three whatever the benchmarks write, rewritten after every stage (and every 15 s while one
# runs) so that a kill keeps what was done:
#   gpu_all.log   this script's output as it goes, the summary at its end;
#   results.tgz   every benchmark's JSON;
#   logs.tgz      every stage's log, the summary (logs/summary.tsv) and the plots.
# The machine that runs this brings back at most 8 files from OUT: a new benchmark adds a JSON to
# results.tgz, never a file to OUT. Do not copy files to OUT one by one.
# (--quick: a smoke run: fewer repeats, and e2e on the small config at 64 px only.) Knobs: BUDGET_S,
# CHECK_WINDOW_S (phase 2's length, default 130 s), BENCHES (groups and order), E2E_MIN_S, PY (the
# interpreter that holds torch).
# Exit status: 0 every stage ran to its end and passed (e2e cut at its limit after its target rows were
# written counts as run: PARTIAL in the summary, which names it; its default run never ends in its limit);
# 1 a stage failed, or a build, test or sanitizer stage timed out; 2 none failed, but a stage was skipped
# (no time left, or compute-sanitizer missing) or a benchmark was cut at its limit before its targets' rows
# (CUT: its JSON keeps what it measured). The summary names them.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT" || exit 1
  WORK="${WORK:-/tmp/worldvla_gpu_all}"
  RESULTS="$WORK/results"
  MAIN_LOG="$OUT/gpu_all.log"
  rm -rf "$WORK/results" "$WORK/logs"  # an earlier run's files must not come back as this one's
else
  RESULTS="benchmarks/results"
  WORK="$RESULTS"
  MAIN_LOG="$RESULTS/gpu_all.log"
fi
BUDGET_S="${BUDGET_S:-540}"
CHECK_WINDOW_S="${CHECK_WINDOW_S:-130}"
E2E_MIN_S="${E2E_MIN_S:-120}"
QUICK="${1:-}"
START=$(date +%s)
LOGS="$WORK/logs"
SUMMARY="$LOGS/summary.tsv"
mkdir -p "$LOGS" "$RESULTS"
: > "$SUMMARY"
exec > >(tee "$MAIN_LOG") 2>&1
TEE_PID=$!
# The interpreter that holds torch (some images name it python3 only); nvcc where CUDA installs it.
PY="${PY:-$(command -v python3 || command -v python)}"
[[ -x /usr/local/cuda/bin/nvcc ]] && ! command -v nvcc >/dev/null && export PATH="/usr/local/cuda/bin:$PATH"

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# pack NAME TAR-ARGS...: OUT/NAME written under a temporary name and renamed when whole, so that a kill
# mid-write never leaves a broken archive under the real name (tar's status 1, a log that grew while it
# was read, is fine).
pack() {
  local name=$1 rc
  shift
  tar czf "$OUT/$name.part" "$@" 2>/dev/null
  rc=$?
  if (( rc <= 1 )); then mv -f "$OUT/$name.part" "$OUT/$name"; else rm -f "$OUT/$name.part"; fi
}

# What is done so far, into OUT (gpu_all.log is there already, written as it goes).
deliver() {
  [[ -n "${OUT:-}" ]] || return 0
  pack results.tgz -C "$RESULTS" -T <(find "$RESULTS" -maxdepth 1 -name '*.json' -printf '%f\n' | sort)
  pack logs.tgz -C "$WORK" --exclude='*.json' logs results
}

# Deliveries every 15 s while a stage (or phase 2's parallel stages) runs: a kill during a long stage
# then keeps the JSON it has rewritten so far. One delivery at a time: stop_ticker waits for the ticker,
# whose trap runs only once a tar or mv under way has finished (its sleep is a waited background job, so
# a stop never waits for it), before the main shell delivers. Its output goes nowhere: an orphaned sleep
# must not hold this script's log pipe open.
TICKER=
start_ticker() {
  [[ -n "${OUT:-}" ]] || return 0
  ( trap 'exit 0' TERM
    while true; do
      sleep 15 & wait $!
      deliver
    done ) > /dev/null 2>&1 &
  TICKER=$!
}
stop_ticker() {
  [[ -n "$TICKER" ]] || return 0
  kill "$TICKER" 2>/dev/null
  wait "$TICKER" 2>/dev/null
  TICKER=
}

# The line(s) of a stage's log that say how it went.
verdict() {
  local log="$LOGS/$1.log"
  case "$1" in
    build*)    grep -E "^build:|[Ee]rror" "$log" | tail -1 ;;
    tests*)    # pytest's closing line, or the counts so far of a run cut short
               grep -E "^=+ .*(passed|failed|error|skipped|deselected|no tests ran).* in [0-9.]+s" "$log" | tail -1 \
                 || echo "cut short: $(grep -c " PASSED" "$log") passed, $(grep -c " FAILED" "$log") failed," \
                         "$(grep -c " ERROR" "$log") errors so far" ;;
    bench*)    grep -E "^-> |\.json$|failed:|Error" "$log" | tail -1 ;;
    sanitize*) grep -E "ERROR SUMMARY|^sanitize: [an0-9]" "$log" | tail -2 | tr '\n' ' ' ;;
  esac
}

# stage NAME LIMIT_S CMD...: CMD under `timeout`, for at most LIMIT_S and never past the budget less
# KEEP_S (what the stages after it keep back). A benchmark stopped at its limit is CUT (its JSON keeps
# what it measured), or PARTIAL where its log says its target rows were written before (e2e prints
# "e2e: target rows written -> JSON" once its JSON holds them); any other stage TIMEOUT. Stages the main
# shell runs deliver to OUT when they end; phase 2's, run in the background, leave that to the main shell
# after their wait.
KEEP_S=0
stage() {
  local name=$1 limit=$2
  shift 2
  local avail=$(( $(left) - 5 - KEEP_S ))
  (( limit > avail )) && limit=$avail
  if (( limit < 20 )); then
    printf '%s\tSKIPPED\t0\tno time left (%ss of the budget, %ss kept for later stages)\n' "$name" "$(left)" \
      "$KEEP_S" >> "$SUMMARY"
    echo "== $name: skipped, no time left"
    return 99
  fi
  echo "== $name (limit ${limit}s; $(left)s of the budget left) $(date -u +%T)"
  local t0 rc status main=0
  (( BASHPID == $$ )) && main=1
  (( main )) && start_ticker
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) if [[ $name != bench-* ]]; then
               status=TIMEOUT
             elif grep -qE "^[a-z0-9_]+: target rows written" "$LOGS/$name.log"; then
               status=PARTIAL  # cut after the rows its targets are read from: not a degraded run
             else
               status=CUT
             fi ;;
    *) status="FAIL($rc)" ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$(verdict "$name" | cut -c1-110)" >> "$SUMMARY"
  echo "-- $name: $status in $(( $(date +%s) - t0 ))s"
  if (( main )); then
    stop_ticker
    deliver
  fi
  return $rc
}

show() {
  local log="$LOGS/$1.log"
  [[ -f "$log" ]] || return 0
  echo "-- tail of $1"
  tail -n "${2:-8}" "$log"
  [[ -z "$(tail -c 1 "$log")" ]] || echo  # a log cut mid-line
}

echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)"
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
"$PY" -c "import triton; print('triton', triton.__version__)" || true
echo "nvcc: $(command -v nvcc || echo 'not found'); ninja: $(command -v ninja || echo 'not found')"
# What the build and the parallel tests lean on (the machine has no package index to fetch them from).
"$PY" - <<'PYEOF'
import importlib.util as u
print("modules:", ", ".join(f"{m} {'yes' if u.find_spec(m) else 'MISSING'}"
                            for m in ("scikit_build_core", "pybind11", "xdist", "pytest_timeout", "h5py")))
PYEOF
CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
export CMAKE_BUILD_PARALLEL_LEVEL

# ---------------------------------------------------------------- 1. build
# The extension with the CUDA kernels ($1 = ON) or without ($1 = OFF): through pip and scikit-build-core
# where it is installed (offline: --no-build-isolation), else the same CMake project by hand, the
# extension and the two folders put in place; with Ninja where it is installed, else CMake's default
# generator (cmake --build drives either).
BUILD_SH='
  cuda=$1
  t0=$(date +%s)
  if "$PY" -c "import scikit_build_core" 2>/dev/null; then
    WORLDVLA_CUDA=$cuda "$PY" -m pip install --no-build-isolation --no-deps -e . -q || exit 1
  else
    echo "scikit-build-core missing: plain CMake build"
    dir=build/gpu_all-$cuda  # one folder per setting: a CMake cache keeps its first generator
    generator=()
    command -v ninja >/dev/null && generator=(-G Ninja)
    cmake -S . -B "$dir" "${generator[@]}" -DWORLDVLA_CUDA="$cuda" -DCMAKE_BUILD_TYPE=Release \
      -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$PY" > /dev/null || exit 1
    cmake --build "$dir" -j"$(nproc)" || exit 1
    cp "$dir"/_C*.so worldvla/ && ln -sfn ../kernels worldvla/kernels && ln -sfn ../benchmarks worldvla/benchmarks \
      || exit 1
  fi
  if [[ $cuda == OFF ]]; then
    "$PY" -c "import worldvla._C" || exit 1
    echo "build: CPU-only extension; the native CUDA kernels are missing"
    exit 0
  fi
  "$PY" -c "import worldvla._C as C; assert C.with_cuda, \"built without CUDA\"; print(\"worldvla._C with CUDA\")" || exit 1
  # One native kernel launched and checked: a driver too old for the toolkit shows here, not in every test.
  "$PY" -m benchmarks.sanitize --backend native --only "decode_attention bf16" || exit 1
  echo "build: ok in $(( $(date +%s) - t0 )) s"'
stage build 240 env PY="$PY" bash -c "$BUILD_SH" build ON
BUILD_RC=$?
show build 10
if (( BUILD_RC != 0 )); then  # without the CUDA kernels the Triton half can still be tested and measured
  stage build-cpu-only 120 env PY="$PY" bash -c "$BUILD_SH" build OFF
  show build-cpu-only 5
fi
stage info 30 "$PY" -m worldvla.cli info  # what the build holds, the GPU, the auto order per op
show info 14

# ---------------------------------------------------------------- 3's limits (the window below leaves their floors)
# BENCHES: which groups, in which order (default "attention kernels train e2e": the kernel targets
# (the attention's, then the fused cross-entropy's memory and time), training tokens/s, MFU and peak
# memory (small and 1B-class configs), then the latency targets, which take what is left of the budget).
# Each group runs for at most its BENCH_LIMIT and keeps back the BENCH_FLOOR of every group after it
# (plus 2 s each for the deliveries between stages); e2e's target rows (7B, 5 actions, 256 px: model build,
# CUDA graphs and 9 interleaved rounds of its four sides; then its 256 px frame) need about E2E_MIN_S.
declare -A BENCH_LIMIT=([attention]=80 [kernels]=45 [train]=60 [e2e]=240)
declare -A BENCH_FLOOR=([attention]=40 [kernels]=25 [train]=25 [e2e]=$E2E_MIN_S)
read -ra GROUPS_RUN <<< "${BENCHES:-attention kernels train e2e}"
BENCH_KEEP=0
for group in "${GROUPS_RUN[@]}"; do
  BENCH_KEEP=$(( BENCH_KEEP + ${BENCH_FLOOR[$group]:-0} + 2 ))
done

# ---------------------------------------------------------------- 2. correctness (parallel)
# The window: CHECK_WINDOW_S, or less where the build took long: what is left less the benchmarks' floors
# (BENCH_KEEP) and 10 s (this phase's wrap-up, the first benchmark stage's 5 s margin). Under 20 s its
# stages are skipped (and say so); its stages also keep BENCH_KEEP back (KEEP_S) whatever they are given.
WINDOW=$(( $(left) - 10 - BENCH_KEEP ))
(( WINDOW > CHECK_WINDOW_S )) && WINDOW=$CHECK_WINDOW_S
(( WINDOW < 0 )) && WINDOW=0
echo "== correctness window ${WINDOW}s (CHECK_WINDOW_S ${CHECK_WINDOW_S}s; $(left)s of the budget left, ${BENCH_KEEP}s" \
  "kept for the benchmarks' floors)"
WINDOW_END=$(( $(date +%s) + WINDOW ))
KEEP_S=$BENCH_KEEP
PYTEST=("$PY" -m pytest -v -p no:cacheprovider --durations=8)
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout=120)
# Triton compiles each kernel configuration once per process (fp32 ones for tens of seconds):
# pytest-xdist spreads the tests over processes, which share Triton's on-disk cache.
xdist() { "$PY" -c "import xdist" 2>/dev/null && echo "-n $1"; }
# Every test of the Triton files runs on the GPU when there is one; of the other files, the
# gpu-marked ones. Files are named: collecting all of tests/ needs metaworld and websockets.
TRITON_A=(tests/test_triton_attention.py tests/test_triton_decode.py)
TRITON_B=()
for f in tests/test_triton_*.py; do
  [[ " ${TRITON_A[*]} " == *" $f "* ]] || TRITON_B+=("$f")
done
start_ticker  # the stages below run in the background: the main shell delivers meanwhile
# shellcheck disable=SC2046  # xdist's "-n N" splits into two words on purpose
stage tests-triton-attention "$WINDOW" "${PYTEST[@]}" $(xdist 6) "${TRITON_A[@]}" & P1=$!
# shellcheck disable=SC2046
stage tests-triton-other "$WINDOW" "${PYTEST[@]}" $(xdist 4) "${TRITON_B[@]}" & P2=$!
# shellcheck disable=SC2046
stage tests-native "$WINDOW" "${PYTEST[@]}" $(xdist 2) -m gpu tests/test_native_*.py tests/test_inference.py \
  tests/test_inference_frames.py tests/test_train_convergence.py & P3=$!

# compute-sanitizer over a small driver (a python + torch start-up under a sanitizer is slow, a
# whole pytest run far slower); most valuable run first, each only while the window has room.
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
sanitize_all() {
  local run tool backend room
  for run in memcheck:native racecheck:native memcheck:triton synccheck:native initcheck:native; do
    tool=${run%%:*} backend=${run##*:} room=$(( WINDOW_END - $(date +%s) ))
    if (( room < 30 )); then
      printf '%s\tSKIPPED\t0\tno room left in the correctness window\n' "sanitize-$tool-$backend" >> "$SUMMARY"
      continue
    fi
    # No caching allocator: every tensor is its own allocation, so out-of-bounds accesses show.
    stage "sanitize-$tool-$backend" $(( room < 100 ? room : 100 )) env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      "$SAN" --tool "$tool" --error-exitcode 9 --print-limit 20 "$PY" -m benchmarks.sanitize --backend "$backend"
    # Some virtualized machines refuse the sanitizer outright: say so once and stop trying.
    if grep -qE "Device not supported|error 999|CUDA_ERROR_UNKNOWN" "$LOGS/sanitize-$tool-$backend.log"; then
      printf 'sanitize\tUNSUPPORTED\t0\tcompute-sanitizer cannot attach to this device\n' >> "$SUMMARY"
      break
    fi
  done
}
if [[ -n "$SAN" ]]; then
  sanitize_all & P4=$!
else
  printf 'sanitize\tSKIPPED\t0\tcompute-sanitizer not found\n' >> "$SUMMARY"; P4=
fi
wait $P1 $P2 $P3 $P4
stop_ticker
deliver
KEEP_S=0
for s in tests-triton-attention tests-triton-other tests-native; do show "$s" 4; done
grep -hE "^(FAILED|ERROR) " "$LOGS"/tests-*.log | head -20
for f in "$LOGS"/sanitize-*.log; do [[ -f "$f" ]] && show "$(basename "$f" .log)" 4; done

# ---------------------------------------------------------------- 3. benchmarks (alone)
# The groups (BENCHES, limits and floors above), each keeping back the floors of the groups after it.
for i in "${!GROUPS_RUN[@]}"; do
  group=${GROUPS_RUN[$i]}
  KEEP_S=0
  for later in "${GROUPS_RUN[@]:i+1}"; do
    KEEP_S=$(( KEEP_S + ${BENCH_FLOOR[$later]:-0} + 2 ))
  done
  case $group in
    attention)  # decode (the 16k-token cache first), then prefill (256 px, causal, 512 px); its JSON is
      # rewritten after every decode case and every mode of a prefill case
      stage bench-attention "${BENCH_LIMIT[attention]}" "$PY" -m worldvla.cli bench attention $QUICK --out "$RESULTS"
      show bench-attention 6 ;;
    e2e)  # Chameleon-7B (random weights), then the small config: the chunk of 5 at 256 px and the next
      # frame at 256 px (the latency targets' rows: "e2e: target rows written" in its log once both are in
      # its JSON), then the chunk of 10 at 256 px, chunks at 512 px; the JSON rewritten after each chunk
      # size and the frame. Its default run outlasts its limit: cut after the target rows, it is PARTIAL
      stage bench-e2e "${BENCH_LIMIT[e2e]}" "$PY" -m benchmarks.e2e --chunks 5 10 $QUICK --out "$RESULTS"
      show bench-e2e 14 ;;
    kernels)  # one process; each benchmark writes its JSON when it ends
      stage bench-kernels "${BENCH_LIMIT[kernels]}" "$PY" -m worldvla.cli bench cross_entropy vq sampling $QUICK \
        --out "$RESULTS"
      show bench-kernels 20 ;;
    train)  # tokens/s, MFU and peak memory against the reference-style path; JSON rewritten per config
      stage bench-train "${BENCH_LIMIT[train]}" "$PY" -m worldvla.cli bench train $QUICK --out "$RESULTS"
      show bench-train 8 ;;
    *) echo "unknown benchmark group $group (attention, kernels, train, e2e)" ;;
  esac
done
KEEP_S=0

# ---------------------------------------------------------------- summary
echo
echo "== summary: $(( $(date +%s) - START ))s of ${BUDGET_S}s; logs in $LOGS, results in $RESULTS"
printf '%-28s %-9s %5s  %s\n' stage status sec result
while IFS=$'\t' read -r name status sec note; do
  printf '%-28s %-9s %5s  %s\n' "$name" "$status" "$sec" "$note"
done < "$SUMMARY"
ls "$RESULTS"/*.json 2>/dev/null | sed 's/^/  /'
# A sanitizer that cannot attach is not a failure of the code.
if grep -q "^sanitize	UNSUPPORTED" "$SUMMARY"; then
  FAILED=$(grep -vE "^sanitize-" "$SUMMARY" | awk -F'\t' '$2 ~ /^(FAIL|TIMEOUT)/ {print $1}' | tr '\n' ' ')
else
  FAILED=$(awk -F'\t' '$2 ~ /^(FAIL|TIMEOUT)/ {print $1}' "$SUMMARY" | tr '\n' ' ')
fi
SKIPPED=$(awk -F'\t' '$2 == "SKIPPED" {print $1}' "$SUMMARY" | tr '\n' ' ')
CUT=$(awk -F'\t' '$2 == "CUT" {print $1}' "$SUMMARY" | tr '\n' ' ')
PARTIAL=$(awk -F'\t' '$2 == "PARTIAL" {print $1}' "$SUMMARY" | tr '\n' ' ')
FAILED=${FAILED% } SKIPPED=${SKIPPED% } CUT=${CUT% } PARTIAL=${PARTIAL% }
RC=0
if [[ -n "$FAILED" ]]; then
  RC=1
elif [[ -n "$SKIPPED$CUT" ]]; then
  RC=2
fi
echo "failed: ${FAILED:-none}; skipped: ${SKIPPED:-none}; cut at their limit: ${CUT:-none}"
# Not counted in the exit status: their targets' rows are in their JSON; the rows after them are missing.
[[ -n "$PARTIAL" ]] && echo "cut at their limit after their target rows were written (not counted): $PARTIAL"
if [[ -n "${OUT:-}" ]]; then
  deliver
  echo "-> $OUT: gpu_all.log, results.tgz ($(find "$RESULTS" -maxdepth 1 -name '*.json' | wc -l) JSON), logs.tgz"
  n=$(find "$OUT" -maxdepth 1 -type f | wc -l)
  (( n > 8 )) && echo "warning: $n files in $OUT; only 8 come back"
fi
echo "== done $(date -u +%FT%TZ), exit status $RC (0 all ran and passed, 1 a failure, 2 skipped or cut stages;" \
  "PARTIAL not counted)"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit $RC
