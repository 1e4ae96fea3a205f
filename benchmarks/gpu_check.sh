#!/usr/bin/env bash
# One-shot check on a fresh GPU machine (torch with CUDA and nvcc preinstalled, no internet). Builds the CUDA kernels
# in place for the GPU it runs on, then, ordered by what ships, so that a run cut short still answers what matters:
#
#   1. tests_paged     the paged ops and the gated model on CUDA: every CUDA twin of python_tests/test_paged_*.py and
#                      test_gated_*.py (generate() against the CPU in float32 and bfloat16, incremental decode against
#                      the full forward, torch.compile, CUDA graphs of a whole gated decode step)
#   2. memcheck, racecheck, synccheck (compute-sanitizer) on the paged kernels' paths (test_paged_kernel_paths.py)
#   3. tests_rect      the rectangle ops' CUDA twins (append_kv_, compact_kv_, decode_attention, gate_flags)
#   4. memcheck of the rectangle kernels' paths (test_cuda_kernel_paths.py)
#   5. bench           the op benchmarks (paged ops first), bandwidth against the measured copy
#   6. tests_rest      every other test (the CPU ones)
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#
# Everything lands in OUT_DIR: env.txt, build.log (with the ptxas -v register/spill report), one log (and JUnit XML)
# per test step, one log per sanitizer run, bench.txt and bench.json, progress.txt (one line per finished step, so a
# run killed from outside still tells how far it got) and summary.txt (exit codes, failures, sanitizer summaries,
# the ptxas table, benchmark rows). The steps share one deadline, TOTAL_BUDGET seconds (default 465, under 8 minutes):
# each gets at most its own cap and always leaves the later steps their minimum; a step that runs out of time is
# killed and recorded as 124, and the run goes on. Without a GPU (the CI rehearsal of the GPU machine) the build and
# the import run as on the GPU machine, the GPU steps record "no GPU" and step 6 runs the whole suite. Exit status:
# 0 when every step that ran passed. GPU clocks and settings are never touched.
#
#   PYTHON                interpreter with torch (default: first of python, python3 that imports torch)
#   TORCH_CUDA_ARCH_LIST  architectures to build (default: the capability of GPU 0, e.g. 9.0 on an H100/H200;
#                         8.0;9.0 when no GPU is visible)
#   MAX_JOBS              parallel compile jobs (default 16)
#   TOTAL_BUDGET          seconds for the whole run (default 465)
#   CAP_SCALE             multiplies every step's cap (default 1; the 2-core CI rehearsal uses more)
#   BENCH_ARGS            extra arguments of benchmarks/run.py (default --sections ops bandwidth)
#   build/gpu-tools/      put on PATH when the machine has no ninja (scripts/gpu_tools.sh makes it; carry it along)
#   GPU_CHECK_CMAKE=1     also build the CPU-only CMake library and run its tests (left out by default: covered by
#                         CI, and its build would eat the test budget)
set -uo pipefail

OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
ROOT=$PWD
start=$(date +%s)
deadline=$(( start + ${TOTAL_BUDGET:-465} ))
: >"$OUT/progress.txt"

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

# Without ninja torch builds serially (minutes more): use the carried one (scripts/gpu_tools.sh) if there is none.
if ! command -v ninja >/dev/null && [ -x "$ROOT/build/gpu-tools/ninja" ]; then export PATH="$ROOT/build/gpu-tools:$PATH"; fi
GPU=$("$PY" -c "import torch; print(1 if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  [ "$GPU" = 1 ] && TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
  [ -n "${TORCH_CUDA_ARCH_LIST:-}" ] || TORCH_CUDA_ARCH_LIST="8.0;9.0"
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
  local name=$1 cap=$(( $2 * ${CAP_SCALE:-1} )) reserve=$3 log=$4; shift 4
  local t; t=$(budget "$cap" "$reserve")
  if [ "$t" -lt 10 ]; then
    echo "no time left ($t s): skipped" | tee "$log"; printf -v "rc_$name" '%s' "skipped (no time)"
  else
    step "$name (log: $(basename "$log"), timeout ${t}s)"
    timeout --kill-after=10 "$t" "$@" >"$log" 2>&1
    printf -v "rc_$name" '%s' "$?"
    echo "$name exit code: $(eval echo "\$rc_$name")"
  fi
  echo "$name: $(eval echo "\$rc_$name") after $(( $(date +%s) - start )) s" >>"$OUT/progress.txt"
}
# no_gpu NAME...: records the GPU-only steps as not run.
no_gpu() {
  for name in "$@"; do printf -v "rc_$name" '%s' "no GPU"; echo "$name: no GPU" >>"$OUT/progress.txt"; done
}

step "environment" | tee "$OUT/env.txt"
{
  nvidia-smi -L 2>/dev/null || echo "nvidia-smi -L failed (no GPU driver)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
  echo "nvcc: $(nvcc --version 2>/dev/null | tail -n 1 || echo 'not found')"
  echo "compute-sanitizer: ${SANITIZER:-not found}"
  echo "ninja: $(command -v ninja || echo 'NOT FOUND: serial build (run scripts/gpu_tools.sh and carry build/gpu-tools)')"
  echo "gcc: $(gcc --version 2>/dev/null | head -n 1 || echo 'not found')"
  echo "python: $PY ($("$PY" --version 2>&1))"
  "$PY" - <<'PY'
import importlib.metadata as md, importlib.util, os, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
from torch.utils import cpp_extension
print(f"CUDA_HOME (torch's view): {cpp_extension.CUDA_HOME}")
for mod in ("setuptools", "ninja", "pytest", "numpy", "transformers", "safetensors", "peft", "hypothesis"):
    version = md.version(mod) if importlib.util.find_spec(mod) else None
    print(f"{mod}: {version or 'NOT INSTALLED'}")
print(f"cpus: {os.cpu_count()}")
PY
  echo "GPU=$GPU ATTNGATE_CUDA=$ATTNGATE_CUDA TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS" \
    "budget=${TOTAL_BUDGET:-465}s"
} 2>&1 | tee -a "$OUT/env.txt"

# setup.py passes -Xptxas=-v,-warn-spills to nvcc, so the per-kernel register/spill report lands in build.log.
run_step build 150 240 "$OUT/build.log" "$PY" setup.py build_ext --inplace
if [ "$rc_build" = 0 ]; then
  "$PY" -c "import attngate_ext as a; assert a.cuda_kernels_available(), 'built without CUDA kernels'; \
print('CUDA kernels registered')" >>"$OUT/build.log" 2>&1 || rc_build=2
fi

cd python_tests
PAGED_TESTS=(test_paged_*.py test_gated_*.py)
RECT_TESTS=(test_append_kv.py test_compact_kv.py test_decode_attention.py test_gate_flags.py test_bad_input.py
            test_overlap_checks.py test_cuda_kernel_paths.py test_compile.py test_cuda_graphs.py)
cd "$ROOT"
PAGED_TESTS=("${PAGED_TESTS[@]/#/python_tests/}")
RECT_TESTS=("${RECT_TESTS[@]/#/python_tests/}")
ignore_args=()
for f in "${PAGED_TESTS[@]}" "${RECT_TESTS[@]}"; do ignore_args+=(--ignore "$f"); done

GPU_STEPS=(tests_paged memcheck_paged racecheck_paged synccheck_paged tests_rect memcheck_rect bench)
for name in "${GPU_STEPS[@]}" tests_rest; do printf -v "rc_$name" '%s' skipped; done
pytest_args=(-v -rfEs --durations=10 -p no:cacheprovider)  # -v: a killed run still shows how far it got
if [ "${GPU_CHECK_CMAKE:-0}" = 1 ] && command -v cmake >/dev/null; then
  cmake -S . -B build/cmake-gpu-check -DATTNGATE_CUDA=OFF \
    -DCMAKE_PREFIX_PATH="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')" >"$OUT/cmake.log" 2>&1 &&
    timeout 150 cmake --build build/cmake-gpu-check -j "$MAX_JOBS" >>"$OUT/cmake.log" 2>&1
  export ATTNGATE_CMAKE_LIB="$ROOT/build/cmake-gpu-check/libattngate_ops.so"
else
  pytest_args+=(--ignore python_tests/test_cmake_library.py)  # each of its tests needs the CMake library built
fi
# One allocation per tensor (no caching allocator), so memcheck sees every out-of-bounds access.
sanitize() {  # sanitize TOOL TEST_ARGS...
  local tool=$1; shift
  env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 1 --print-limit 20 \
    "$PY" -m pytest "$@" -q -p no:cacheprovider
}

if [ "$rc_build" != 0 ]; then
  echo "build failed: tests, benchmarks and sanitizers skipped"
elif ! "$PY" -c "import pytest" 2>/dev/null; then
  echo "pytest is NOT installed: tests and sanitizers skipped" | tee "$OUT/tests-paged.log"
  if [ "$GPU" = 1 ]; then
    run_step bench 90 0 "$OUT/bench.txt" "$PY" benchmarks/run.py --device cuda --json "$OUT/bench.json" \
      ${BENCH_ARGS---sections ops bandwidth}
  fi
elif [ "$GPU" = 1 ]; then
  # 1. what every gated decode step runs: the paged ops and the gated model on CUDA (no -x: every failure counts).
  run_step tests_paged 150 210 "$OUT/tests-paged.log" "$PY" -m pytest "${PAGED_TESTS[@]}" -k cuda "${pytest_args[@]}" \
    --junitxml="$OUT/tests-paged.xml"
  # 2. the sanitizers on the paged kernels (small shapes that reach every kernel and path; no CUDA graphs).
  if [ -n "$SANITIZER" ]; then
    paths=(python_tests/test_paged_kernel_paths.py python_tests/test_paged_decode_step_errors.py -k cuda)
    run_step memcheck_paged 60 150 "$OUT/memcheck-paged.log" sanitize memcheck "${paths[@]}"
    run_step racecheck_paged 50 120 "$OUT/racecheck-paged.log" sanitize racecheck "${paths[@]}"
    run_step synccheck_paged 35 100 "$OUT/synccheck-paged.log" sanitize synccheck "${paths[@]}"
  fi
  # 3-4. the rectangle ops (a public contract: same kernels, other addressing).
  run_step tests_rect 90 70 "$OUT/tests-rect.log" "$PY" -m pytest "${RECT_TESTS[@]}" -k cuda "${pytest_args[@]}" \
    --junitxml="$OUT/tests-rect.xml"
  if [ -n "$SANITIZER" ]; then
    run_step memcheck_rect 40 60 "$OUT/memcheck-rect.log" sanitize memcheck python_tests/test_cuda_kernel_paths.py \
      -k "cuda and not cpu and not stress and not 4099 and not 4128"
  else
    echo "compute-sanitizer not found: the sanitizer steps are skipped" | tee "$OUT/memcheck-paged.log"
    for name in memcheck_paged racecheck_paged synccheck_paged memcheck_rect; do
      printf -v "rc_$name" '%s' "n/a (no compute-sanitizer)"
    done
  fi
  # 5. the benchmarks, 6. everything else.
  run_step bench 90 50 "$OUT/bench.txt" "$PY" benchmarks/run.py --device cuda --json "$OUT/bench.json" \
    ${BENCH_ARGS---sections ops bandwidth}
  run_step tests_rest 400 0 "$OUT/tests-rest.log" "$PY" -m pytest python_tests "${ignore_args[@]}" "${pytest_args[@]}" \
    --junitxml="$OUT/tests-rest.xml"
else
  echo "no GPU visible: the GPU steps are recorded as 'no GPU'; the whole suite runs (its CUDA twins skip)"
  no_gpu "${GPU_STEPS[@]}"
  run_step tests_rest 900 0 "$OUT/tests-rest.log" "$PY" -m pytest python_tests "${pytest_args[@]}" \
    --junitxml="$OUT/tests-rest.xml"
fi

{
  step "summary"
  summary_line="build: $rc_build"
  for name in "${GPU_STEPS[@]}" tests_rest; do summary_line+=" | $name: $(eval echo "\$rc_$name")"; done
  echo "$summary_line | $(( $(date +%s) - start )) s total (124 = timeout)"
  echo "-- build.log: ptxas per kernel (registers, spill stores/loads) --"
  awk '/Compiling entry function/ { fn = $0; sub(/.*entry function ./, "", fn); sub(/. for .*/, "", fn) }
       /spill stores/ { split($0, w, ","); st = w[2]; ld = w[3] }
       /Used [0-9]+ registers/ { match($0, /Used [0-9]+ registers/); r = substr($0, RSTART + 5, RLENGTH - 15)
                                 printf "%4s regs |%s |%s | %s\n", r, st, ld, fn }' "$OUT/build.log" \
    | { command -v c++filt >/dev/null && c++filt || cat; } | cut -c1-160 | sort -u | head -n 60
  echo "-- build.log: warnings from our sources --"
  grep -E "csrc/.*(warning|error)" "$OUT/build.log" | head -n 10
  [ "$rc_build" = 0 ] || { echo "-- build.log (last 20 lines) --"; tail -n 20 "$OUT/build.log"; }
  for f in tests-paged tests-rect tests-rest; do
    [ -f "$OUT/$f.log" ] || continue
    echo "-- $f.log: failures and errors --"
    grep -E "^(FAILED|ERROR) " "$OUT/$f.log" | head -n 40
    tail -n 1 "$OUT/$f.log"; echo
  done
  for f in memcheck-paged racecheck-paged synccheck-paged memcheck-rect; do
    [ -f "$OUT/$f.log" ] || continue
    echo "-- $f.log --"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|========= (Invalid|Race|Barrier|Program hit|Error)" "$OUT/$f.log" | head -n 10
    tail -n 2 "$OUT/$f.log"
  done
  if [ -f "$OUT/bench.txt" ]; then echo "-- bench.txt --"; tail -n 40 "$OUT/bench.txt"; fi
} 2>&1 | tee "$OUT/summary.txt"

ok() { case "$1" in 0 | "no GPU" | "n/a (no compute-sanitizer)") return 0 ;; *) return 1 ;; esac; }
status=0
ok "$rc_build" || status=1
for name in "${GPU_STEPS[@]}" tests_rest; do ok "$(eval echo "\$rc_$name")" || status=1; done
exit $status
