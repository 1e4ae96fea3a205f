#!/usr/bin/env bash
# One-shot check on a fresh GPU machine (torch with CUDA and nvcc preinstalled, no internet): builds the CUDA
# kernels in place for the GPU it runs on, runs the whole test suite (CUDA twins first, every failure
# collected), the op benchmarks, and compute-sanitizer (memcheck, synccheck) on a focused set of CUDA tests.
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#
# Everything lands in OUT_DIR: env.txt, build.log (with the ptxas -v register/spill report), tests-cuda.log and
# tests-cuda.xml (every test whose id mentions cuda), bench.txt and bench.json, memcheck.log, synccheck.log,
# tests-rest.log and tests-rest.xml (the rest of the suite), and summary.txt (exit codes, failures, ptxas
# table, benchmark rows). The steps share one deadline, TOTAL_BUDGET seconds (default 465, under 8 minutes):
# each step gets at most its own cap and always leaves the later steps their minimum, a step that runs out of
# time is killed and recorded as 124, and the run goes on. Tests, benchmarks and sanitizers are skipped only
# when the build fails, so no stale library is tested. Exit status: 0 when every step passed. GPU clocks and
# settings are never touched.
#
#   PYTHON                interpreter with torch (default: first of python, python3 that imports torch)
#   TORCH_CUDA_ARCH_LIST  architectures to build (default: the capability of GPU 0, e.g. 9.0 on an H100/H200,
#                         8.0 on an A100; 8.0;9.0 when no GPU is visible)
#   MAX_JOBS              parallel compile jobs (default 16)
#   TOTAL_BUDGET          seconds for the whole run (default 465)
#   BENCH_ARGS            extra arguments of benchmarks/run.py (default --sections ops: the op rows only)
#   GPU_CHECK_CMAKE=1     also build the CPU-only CMake library and run its test (deselected by default: covered by
#                         CI, and its build would eat the test budget)
set -uo pipefail

OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
ROOT=$PWD
start=$(date +%s)
deadline=$(( start + ${TOTAL_BUDGET:-465} ))

export ATTNGATE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, without installing anything
CUDA_BIN="${CUDA_HOME:-/usr/local/cuda}/bin"
if ! command -v nvcc >/dev/null && [ -x "$CUDA_BIN/nvcc" ]; then export PATH="$CUDA_BIN:$PATH"; fi
SANITIZER=$(command -v compute-sanitizer || { [ -x "$CUDA_BIN/compute-sanitizer" ] && echo "$CUDA_BIN/compute-sanitizer"; } || true)

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python python3; do
    if command -v "$cand" >/dev/null && "$cand" -c "import torch" 2>/dev/null; then PY=$(command -v "$cand"); break; fi
  done
fi
[ -n "$PY" ] || { echo "no python that imports torch (set PYTHON)"; exit 1; }

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))" 2>/dev/null)
  [ -n "$TORCH_CUDA_ARCH_LIST" ] || TORCH_CUDA_ARCH_LIST="8.0;9.0"
fi
export TORCH_CUDA_ARCH_LIST

step() { echo; echo "== $* ($(date +%H:%M:%S), $(( $(date +%s) - start )) s) =="; }
# Seconds a step may take: at most $1, leaving $2 seconds for the steps after it.
budget() {
  local left=$(( deadline - $(date +%s) - $2 ))
  if [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}
# run_step NAME CAP RESERVE LOG COMMAND...: runs COMMAND with its budget, output to LOG; sets rc_NAME.
run_step() {
  local name=$1 cap=$2 reserve=$3 log=$4; shift 4
  local t; t=$(budget "$cap" "$reserve")
  if [ "$t" -lt 10 ]; then
    echo "no time left ($t s): skipped" | tee "$log"; printf -v "rc_$name" '%s' "skipped (no time)"; return
  fi
  step "$name (log: $(basename "$log"), timeout ${t}s)"
  timeout --kill-after=10 "$t" "$@" >"$log" 2>&1
  printf -v "rc_$name" '%s' "$?"
  echo "$name exit code: $(eval echo "\$rc_$name")"
}

step "environment" | tee "$OUT/env.txt"
{
  nvidia-smi -L || echo "nvidia-smi -L failed"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  echo "nvcc: $(nvcc --version 2>/dev/null | tail -n 1 || echo 'not found')"
  echo "compute-sanitizer: ${SANITIZER:-not found}"
  echo "gcc: $(gcc --version 2>/dev/null | head -n 1 || echo 'not found')"
  echo "python: $PY ($("$PY" --version 2>&1))"
  "$PY" - <<'PY'
import importlib.util, os, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
from torch.utils import cpp_extension
print(f"CUDA_HOME (torch's view): {cpp_extension.CUDA_HOME}")
for mod in ("setuptools", "ninja", "pytest", "numpy", "transformers", "safetensors", "peft"):
    print(f"{mod}: {'yes' if importlib.util.find_spec(mod) else 'NOT INSTALLED'}")
print(f"cpus: {os.cpu_count()}")
PY
  echo "ATTNGATE_CUDA=$ATTNGATE_CUDA TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS budget=${TOTAL_BUDGET:-465}s"
} 2>&1 | tee -a "$OUT/env.txt"

# setup.py passes -Xptxas=-v,-warn-spills to nvcc, so the per-kernel register/spill report lands in build.log.
run_step build 150 195 "$OUT/build.log" "$PY" setup.py build_ext --inplace
if [ "$rc_build" = 0 ]; then
  "$PY" -c "import attngate_ext as a; assert a.cuda_kernels_available(), 'built without CUDA kernels'; \
print('CUDA kernels registered')" >>"$OUT/build.log" 2>&1 || rc_build=2
fi

rc_tests_cuda=skipped rc_tests_rest=skipped rc_bench=skipped rc_memcheck=skipped rc_synccheck=skipped
if [ "$rc_build" = 0 ] && "$PY" -c "import pytest" 2>/dev/null; then
  pytest_args=(-v -rfEs --durations=10 -p no:cacheprovider)  # -v: a killed run still shows how far it got
  if [ "${GPU_CHECK_CMAKE:-0}" = 1 ] && command -v cmake >/dev/null; then
    cmake -S . -B build/cmake-gpu-check -DATTNGATE_CUDA=OFF \
      -DCMAKE_PREFIX_PATH="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')" >"$OUT/cmake.log" 2>&1 &&
      timeout 150 cmake --build build/cmake-gpu-check -j "$MAX_JOBS" >>"$OUT/cmake.log" 2>&1
    export ATTNGATE_CMAKE_LIB="$ROOT/build/cmake-gpu-check/libattngate_ops.so"
  else
    pytest_args+=(--deselect python_tests/test_cmake_library.py::test_cmake_library_loads_and_matches_reference)
  fi
  # CUDA twins first (no -x: every failure is collected), so a slow CPU remainder cannot cost the GPU results.
  run_step tests_cuda 150 135 "$OUT/tests-cuda.log" "$PY" -m pytest python_tests -k cuda "${pytest_args[@]}" \
    --junitxml="$OUT/tests-cuda.xml"
  run_step bench 90 95 "$OUT/bench.txt" "$PY" benchmarks/run.py --device cuda --json "$OUT/bench.json" \
    ${BENCH_ARGS---sections ops}
  if [ -n "$SANITIZER" ]; then
    # One allocation per tensor (no caching allocator), so memcheck sees every out-of-bounds access; small shapes
    # that reach every kernel and path (no 1 GiB stress, no CUDA graphs: those need the caching allocator).
    san_tests=(python_tests/test_cuda_kernel_paths.py -k "cuda and not cpu and not stress and not 4099 and not 4128")
    run_step memcheck 60 65 "$OUT/memcheck.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck \
      --error-exitcode 1 --print-limit 20 "$PY" -m pytest "${san_tests[@]}" -q -p no:cacheprovider
    run_step synccheck 45 40 "$OUT/synccheck.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool synccheck \
      --error-exitcode 1 --print-limit 20 "$PY" -m pytest "${san_tests[@]}" -q -p no:cacheprovider
  else
    echo "compute-sanitizer not found: memcheck and synccheck skipped" | tee "$OUT/memcheck.log" "$OUT/synccheck.log"
    rc_memcheck="n/a (no compute-sanitizer)" rc_synccheck="n/a (no compute-sanitizer)"
  fi
  run_step tests_rest 400 0 "$OUT/tests-rest.log" "$PY" -m pytest python_tests -k "not cuda" "${pytest_args[@]}" \
    --junitxml="$OUT/tests-rest.xml"
elif [ "$rc_build" = 0 ]; then
  echo "pytest is NOT installed: tests and sanitizers skipped" | tee "$OUT/tests-cuda.log"
  rc_tests_cuda="n/a (no pytest)" rc_tests_rest="n/a (no pytest)"
  run_step bench 90 0 "$OUT/bench.txt" "$PY" benchmarks/run.py --device cuda --json "$OUT/bench.json" ${BENCH_ARGS---sections ops}
else
  echo "build failed: tests, benchmarks and sanitizers skipped"
fi

{
  step "summary"
  echo "build: $rc_build | tests (cuda): $rc_tests_cuda | benchmarks: $rc_bench | memcheck: $rc_memcheck |" \
    "synccheck: $rc_synccheck | tests (rest): $rc_tests_rest | $(( $(date +%s) - start )) s total (124 = timeout)"
  echo "-- build.log: ptxas per kernel (registers, spill stores/loads) --"
  awk '/Compiling entry function/ { fn = $0; sub(/.*entry function ./, "", fn); sub(/. for .*/, "", fn) }
       /spill stores/ { split($0, w, ","); st = w[2]; ld = w[3] }
       /Used [0-9]+ registers/ { match($0, /Used [0-9]+ registers/); r = substr($0, RSTART + 5, RLENGTH - 15)
                                 printf "%4s regs |%s |%s | %s\n", r, st, ld, fn }' "$OUT/build.log" \
    | { command -v c++filt >/dev/null && c++filt || cat; } | cut -c1-160 | sort -u | head -n 60
  echo "-- build.log: warnings from our sources --"
  grep -E "csrc/.*(warning|error)" "$OUT/build.log" | head -n 10
  [ "$rc_build" = 0 ] || { echo "-- build.log (last 20 lines) --"; tail -n 20 "$OUT/build.log"; }
  for f in tests-cuda tests-rest; do
    [ -f "$OUT/$f.log" ] || continue
    echo "-- $f.log: failures and errors --"
    grep -E "^(FAILED|ERROR) " "$OUT/$f.log" | head -n 40
    tail -n 1 "$OUT/$f.log"; echo
  done
  for f in memcheck synccheck; do
    [ -f "$OUT/$f.log" ] || continue
    echo "-- $f.log --"
    grep -E "ERROR SUMMARY|========= (Invalid|Race|Barrier|Program hit)" "$OUT/$f.log" | head -n 10
    tail -n 2 "$OUT/$f.log"
  done
  if [ -f "$OUT/bench.txt" ]; then echo "-- bench.txt --"; tail -n 30 "$OUT/bench.txt"; fi
} 2>&1 | tee "$OUT/summary.txt"

[ "$rc_build" = 0 ] && [ "$rc_tests_cuda" = 0 ] && [ "$rc_tests_rest" = 0 ] && [ "$rc_bench" = 0 ] &&
  { [ "$rc_memcheck" = 0 ] || [ -z "$SANITIZER" ]; } && { [ "$rc_synccheck" = 0 ] || [ -z "$SANITIZER" ]; }
