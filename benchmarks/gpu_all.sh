#!/usr/bin/env bash
# One short session on a machine with an NVIDIA GPU (sized for about 8 minutes on an H200 with 16
# cores). Three phases, most valuable first:
#   1. build the CUDA extension;
#   2. correctness, in parallel (none of it is timed): the Triton and native GPU tests in three
#      pytest runs, and compute-sanitizer (memcheck, racecheck, ...) over benchmarks/sanitize.py,
#      each sanitizer run started only while the phase's window has room;
#   3. benchmarks, alone on the machine: attention, the other kernels, end-to-end latency.
# Every stage runs under `timeout` within the overall budget (BUDGET_S, default 465 s) and writes
# its log to $OUT/logs/<stage>.log as it goes; each benchmark writes its JSON (device, versions,
# date, L2 size and rotated input sets inside) to $OUT. The last lines printed are a summary table.
#   OUT=/some/dir bash benchmarks/gpu_all.sh [--quick]     (--quick: fewer benchmark repeats)
# Knobs: BUDGET_S, CHECK_WINDOW_S (phase 2's length, default 150 s), BENCHES (groups and order).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT_DIR="${OUT:-benchmarks/results}"
BUDGET_S="${BUDGET_S:-465}"
CHECK_WINDOW_S="${CHECK_WINDOW_S:-150}"
QUICK="${1:-}"
START=$(date +%s)
LOGS="$OUT_DIR/logs"
SUMMARY="$LOGS/summary.tsv"
mkdir -p "$LOGS"
: > "$SUMMARY"
exec > >(tee "$OUT_DIR/gpu_all.log") 2>&1
TEE_PID=$!

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

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
    sanitize*) grep -E "ERROR SUMMARY|^sanitize: [a0-9]" "$log" | tail -2 | tr '\n' ' ' ;;
  esac
}

# stage NAME LIMIT_S CMD...: CMD under `timeout`, for at most LIMIT_S and never past the budget.
stage() {
  local name=$1 limit=$2; shift 2
  local avail=$(( $(left) - 5 ))
  (( limit > avail )) && limit=$avail
  if (( limit < 20 )); then
    printf '%s\tSKIPPED\t0\tno time left\n' "$name" >> "$SUMMARY"
    echo "== $name: skipped, no time left"
    return 99
  fi
  echo "== $name (limit ${limit}s; $(left)s of the budget left) $(date -u +%T)"
  local t0 rc status
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=TIMEOUT ;;
    *) status="FAIL($rc)" ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$(verdict "$name" | cut -c1-110)" >> "$SUMMARY"
  echo "-- $name: $status in $(( $(date +%s) - t0 ))s"
  return $rc
}

show() {
  local log="$LOGS/$1.log"
  [[ -f "$log" ]] || return 0
  echo "-- tail of $1"
  tail -n "${2:-8}" "$log"
  [[ -z "$(tail -c 1 "$log")" ]] || echo  # a log cut mid-line
}

echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
python -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
python -c "import triton; print('triton', triton.__version__)" || true
CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
export CMAKE_BUILD_PARALLEL_LEVEL

# ---------------------------------------------------------------- 1. build
stage build 240 bash -c '
  t0=$(date +%s)
  WORLDVLA_CUDA=ON python -m pip install --no-build-isolation --no-deps -e . -q || exit 1
  python -c "import worldvla._C as C; assert C.with_cuda, \"built without CUDA\"; print(\"worldvla._C with CUDA\")" || exit 1
  echo "build: ok in $(( $(date +%s) - t0 )) s"'
BUILD_RC=$?
show build 10
if (( BUILD_RC != 0 )); then  # without the CUDA kernels the Triton half can still be tested and measured
  stage build-cpu-only 120 bash -c 'WORLDVLA_CUDA=OFF python -m pip install --no-build-isolation --no-deps -e . -q &&
    echo "build: CPU-only extension; the native CUDA kernels are missing"'
  show build-cpu-only 5
fi

# ---------------------------------------------------------------- 2. correctness (parallel)
WINDOW_END=$(( $(date +%s) + CHECK_WINDOW_S ))
PYTEST=(python -m pytest -v -p no:cacheprovider --durations=8)
python -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout=90)
# Every test of the Triton files runs on the GPU when there is one; of the other files, the
# gpu-marked ones. Files are named: collecting all of tests/ needs metaworld and websockets.
TRITON_A=(tests/test_triton_attention.py tests/test_triton_decode.py)
TRITON_B=()
for f in tests/test_triton_*.py; do
  [[ " ${TRITON_A[*]} " == *" $f "* ]] || TRITON_B+=("$f")
done
stage tests-triton-attention "$CHECK_WINDOW_S" "${PYTEST[@]}" "${TRITON_A[@]}" & P1=$!
stage tests-triton-other "$CHECK_WINDOW_S" "${PYTEST[@]}" "${TRITON_B[@]}" & P2=$!
stage tests-native "$CHECK_WINDOW_S" "${PYTEST[@]}" -m gpu tests/test_native_*.py tests/test_inference.py \
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
      "$SAN" --tool "$tool" --error-exitcode 9 --print-limit 20 python -m benchmarks.sanitize --backend "$backend"
  done
}
if [[ -n "$SAN" ]]; then
  sanitize_all & P4=$!
else
  printf 'sanitize\tSKIPPED\t0\tcompute-sanitizer not found\n' >> "$SUMMARY"; P4=
fi
wait $P1 $P2 $P3 $P4
for s in tests-triton-attention tests-triton-other tests-native; do show "$s" 4; done
grep -hE "^(FAILED|ERROR) " "$LOGS"/tests-*.log | head -20
for f in "$LOGS"/sanitize-*.log; do [[ -f "$f" ]] && show "$(basename "$f" .log)" 4; done

# ---------------------------------------------------------------- 3. benchmarks (alone)
# BENCHES: which groups, in which order (default "attention kernels e2e").
for group in ${BENCHES:-attention kernels e2e}; do
  case $group in
    attention)  # prefill and decode; its JSON is rewritten after every case
      stage bench-attention 120 python -m worldvla.cli bench attention $QUICK --out "$OUT_DIR"
      show bench-attention 6 ;;
    e2e)  # Chameleon-7B (random weights) and the small config at 256 px, chunks of 5: the latency targets
      stage bench-e2e 150 python -m benchmarks.e2e --grid 16 --chunks 5 $QUICK --out "$OUT_DIR"
      show bench-e2e 14 ;;
    kernels)  # one process; each benchmark writes its JSON when it ends
      stage bench-kernels 120 python -m worldvla.cli bench sampling vq cross_entropy $QUICK --out "$OUT_DIR"
      show bench-kernels 20 ;;
    *) echo "unknown benchmark group $group (attention, e2e, kernels)" ;;
  esac
done

# ---------------------------------------------------------------- summary
echo
echo "== summary: $(( $(date +%s) - START ))s of ${BUDGET_S}s; logs in $LOGS, results in $OUT_DIR"
printf '%-28s %-9s %5s  %s\n' stage status sec result
while IFS=$'\t' read -r name status sec note; do
  printf '%-28s %-9s %5s  %s\n' "$name" "$status" "$sec" "$note"
done < "$SUMMARY"
ls "$OUT_DIR"/*.json 2>/dev/null | sed 's/^/  /'
echo "== done $(date -u +%FT%TZ)"
RC=0
cut -f2 "$SUMMARY" | grep -qE "FAIL|TIMEOUT" && RC=1
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit $RC
