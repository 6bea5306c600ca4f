#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build the extension, run the GPU tests, compute-sanitizer
# (memcheck + racecheck) over the native and Triton GPU tests, then every benchmark.
# Results land in $OUT (or benchmarks/results) with device, versions and date inside each JSON.
#   bash benchmarks/gpu_all.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_all.log"
exec > >(tee "$LOG") 2>&1

echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
python -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
python -c "import triton; print('triton', triton.__version__)" || true

echo "== build"
t0=$(date +%s)
WORLDVLA_CUDA=ON pip install --no-build-isolation --no-deps -e . -q || { echo "BUILD FAILED"; exit 1; }
echo "build took $(( $(date +%s) - t0 )) s"
python -c "import worldvla._C as C; assert C.with_cuda; print('worldvla._C with CUDA')"

echo "== GPU tests"
python -m pytest -q tests -m gpu -x -p no:cacheprovider 2>&1 | tail -30

echo "== compute-sanitizer"
for tool in memcheck racecheck; do
  compute-sanitizer --tool "$tool" --error-exitcode 9 python -m pytest -q -x -m gpu tests/test_native_attention.py \
    tests/test_native_vq.py tests/test_native_sampling.py -p no:cacheprovider 2>&1 | tail -8
  echo "compute-sanitizer $tool exit: ${PIPESTATUS[0]}"
done

echo "== benchmarks"
python -m worldvla.cli bench ${1:-} --out "$OUT_DIR"
echo "== done $(date -u +%FT%TZ)"
