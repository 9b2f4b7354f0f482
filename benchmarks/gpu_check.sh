#!/usr/bin/env bash
# The checks of a first session on a CUDA GPU (issue 7), in one command:
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# for a machine that already has nvcc, jax with its CUDA plugin, flax, pytest and hypothesis
# (nothing is downloaded). Steps, each logged to OUT_DIR (default $OUT, else ./gpu_check):
#   1. nvidia-smi, then install this checkout into the machine's own environment (the lent H200
#      machines: Python 3.12, jax 0.11.2 with CUDA, no downloads) with the CUDA module
#      (JSC_CUDA=ON) for CMAKE_CUDA_ARCHITECTURES (default 90): no build isolation (the build
#      uses the installed scikit-build-core, nanobind and jaxlib's headers), no dependency
#      resolution, and a check that jax, jaxlib and flax are unchanged;
#   2. tests/test_cuda.py but its emulator cases (every op on the GPU against the xla backend on
#      the GPU and the dense float64 reference, determinism, the build report);
#   3. the op cases of the benchmark on the GPU, on KITTI scans from JSC_KITTI_DIR (default
#      ../shared/data/kitti), as a table and OUT_DIR/gpu.json.
# Steps 2 and 3 run under timeouts (GPU_CHECK_TEST_S, GPU_CHECK_BENCH_S seconds) sized for a
# 15-minute device lease. The exit status is that of the first failing step.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-${OUT:-gpu_check}}
mkdir -p "$out"
python=${PYTHON:-python3}
status=0

nvidia-smi > "$out/nvidia-smi.txt" 2>&1
echo "== install (log: $out/install.log)"
jax_packages() { "$python" -m pip freeze 2>/dev/null | grep -i -E '^(jax|jaxlib|flax|jax-cuda[0-9]+-[a-z]+)==' || true; }
before=$(jax_packages)
if ! "$python" -m pip install -v --no-build-isolation --no-deps -Ccmake.define.JSC_CUDA=ON \
    -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="${CMAKE_CUDA_ARCHITECTURES:-90}" . > "$out/install.log" 2>&1; then
  tail -40 "$out/install.log"
  exit 1
fi
if [[ "$(jax_packages)" != "$before" ]]; then
  printf 'the install changed the machine'"'"'s JAX:\nbefore:\n%s\nafter:\n%s\n' "$before" "$(jax_packages)"
  exit 1
fi
# -P: the source tree (which has no compiled modules) must not shadow the installed package.
"$python" -P -c "import jax, jax_sparseconv as jsc; print(jax.devices()); print(jsc.build_info())" \
  2>&1 | tee "$out/build_info.txt"

echo "== tests/test_cuda.py on the GPU (log: $out/test_cuda.log)"
timeout "${GPU_CHECK_TEST_S:-300}" "$python" -P -m pytest tests/test_cuda.py -k "not emulated and not race" -v \
  -p no:cacheprovider > "$out/test_cuda.log" 2>&1 || { rc=$?; (( status )) || status=$rc; }
tail -25 "$out/test_cuda.log"

echo "== benchmark, op cases on the GPU (log: $out/bench.log)"
timeout "${GPU_CHECK_BENCH_S:-420}" "$python" -P benchmarks/bench_cpu.py --device gpu --no-network --repeats 5 \
  --out "$out/gpu.json" > "$out/bench.log" 2>&1 || { rc=$?; (( status )) || status=$rc; }
tail -40 "$out/bench.log"
exit "$status"
