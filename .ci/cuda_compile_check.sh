#!/usr/bin/env bash
# CI stage 2: compiles the CUDA kernels (no GPU needed) against the CUDA 13.0 build of torch and checks that
# our sources compile without warnings and that ptxas reports no register spills in any of our kernels
# (decode attention, compaction, append, gate scoring). Prints the ptxas resource usage of every kernel.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CUDA_VENV:-.venv-cuda}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
command -v nvcc >/dev/null || { echo "nvcc not found under $CUDA_HOME"; exit 1; }
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
VENV=$(cd "$VENV" && pwd)
"$VENV/bin/pip" install -q "${CUDA_TORCH_SPEC:-torch==2.14.1}" numpy ninja setuptools wheel
# No CPLUS_INCLUDE_PATH: the kernels include only the stable-ABI headers and nvcc's own; setup.py adds the headers of
# torch's nvidia wheels itself, after nvcc's (see build_helpers/cuda.py).
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
export MAX_JOBS=${MAX_JOBS:-2}
log=build/cuda-compile.log
mkdir -p build
rm -rf build/cuda-lib build/cuda-temp
ATTNGATE_CUDA=1 "$VENV/bin/python" setup.py build_ext -b build/cuda-lib -t build/cuda-temp >"$log" 2>&1 || {
  tail -n 80 "$log"; echo "CUDA build failed (full log: $log)"; exit 1; }

echo "== ptxas resource usage =="
grep -E "Compiling entry function|Function properties|spill stores|Used [0-9]+ registers" "$log" \
  | sed -E 's/ptxas info *: //' | c++filt | sed -E 's/^(Compiling entry function) .(.*). for .(sm_[0-9]+)./\n\1 [\3] \2/' || true

status=0
if grep -E "csrc/.*(warning|Warning)" "$log"; then
  echo "FAIL: warnings from our sources (above)"; status=1
fi
# Spills of any of our kernels (decode attention, compaction, append, gate scoring): the line after each entry
# must say 0 bytes.
spills=$(awk '/Compiling entry function/ {fn=$0} /spill stores/ && (fn ~ /attngate/) && ($0 !~ /0 bytes spill stores, 0 bytes spill loads/) {print fn; print}' "$log")
if [ -n "$spills" ]; then
  echo "$spills"; echo "FAIL: register spills in our kernels (above)"; status=1
fi
# A decode kernel must have been checked (guards against a rename silently emptying the check above).
grep -q "Compiling entry function.*decode_tiled_kernel" "$log" || { echo "FAIL: no decode kernel in the ptxas report"; status=1; }

# The built library registers CUDA kernels for every op (they cannot run here: no GPU).
(cd attngate_ext && find . -name "*.py" ! -name _build_info.py -exec cp --parents {} ../build/cuda-lib/attngate_ext/ \;)
(cd build/cuda-lib && "$VENV/bin/python" - <<'PY'
import torch, attngate_ext
ops = ["gate_flags", "append_kv_", "compact_kv_", "decode_attention", "paged_append_kv_", "paged_compact_kv_",
       "paged_remove_rows_", "paged_decode_attention", "paged_prefill_attention", "paged_decode_step_"]
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"attngate::{op}", "CUDA")]
assert not missing, f"no CUDA kernel registered for {missing}"
print("CUDA kernels registered for:", ", ".join(ops))
PY
) || status=1
[ $status -eq 0 ] && echo "CUDA compile check passed"
exit $status
