#!/usr/bin/env bash
# CI stage 4: a rehearsal of the lent GPU machine on this GPU-less one. A venv with what that machine has (torch 2.11.0
# with CUDA 13.0, transformers 5.17, pytest, hypothesis, peft; no ninja, no matplotlib) runs benchmarks/gpu_check.sh
# end to end on a copy of the tree as the device tool makes it (tracked and unignored files, plus the carried
# build/gpu-tools): the CUDA build with nvcc 13.0, the import with the CUDA kernels compiled in, then every step, the
# GPU-only ones reporting "no GPU". A script that breaks on that machine's versions breaks here first.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${GPU_VENV:-.venv-gpu}
# The GPU machine has Python 3.12; any CPython >= 3.10 builds the same abi3 library, so another one will do.
PY312=${PYTHON312:-}
if [ -z "$PY312" ]; then
  for cand in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 python3; do
    if "$cand" --version >/dev/null 2>&1; then PY312=$cand; break; fi
  done
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PY312" -m venv "$VENV"
fi
VENV=$(cd "$VENV" && pwd)
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q torch==2.11.0 "transformers==5.17.*" pytest hypothesis peft "setuptools<82" wheel
"$VENV/bin/python" - <<'PY'
import importlib.util, torch, transformers
assert torch.__version__.startswith("2.11.0") and torch.version.cuda.startswith("13."), torch.__version__
assert transformers.__version__.startswith("5.17."), transformers.__version__
assert importlib.util.find_spec("ninja") is None and importlib.util.find_spec("matplotlib") is None
print(f"rehearsal venv: torch {torch.__version__}, transformers {transformers.__version__}")
PY
bash scripts/gpu_tools.sh
WORK=$ROOT/build/rehearsal
rm -rf "$WORK" && mkdir -p "$WORK/tree"
git ls-files -co --exclude-standard -z | tar --null -cf - -T - | tar -xf - -C "$WORK/tree"
mkdir -p "$WORK/tree/build" && cp -r build/gpu-tools "$WORK/tree/build/"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
set +e
(cd "$WORK/tree" && PATH="$VENV/bin:$PATH" PYTHON="$VENV/bin/python" TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-2} \
   CAP_SCALE=6 TOTAL_BUDGET=${REHEARSAL_BUDGET:-2400} bash benchmarks/gpu_check.sh "$WORK/out")
rc=$?
set -e
grep -q "torch 2.11.0" "$WORK/out/env.txt" || { echo "FAIL: the rehearsal did not run torch 2.11.0"; rc=1; }
grep -q "CUDA kernels registered" "$WORK/out/build.log" || { echo "FAIL: no CUDA kernels in the rehearsal build"; rc=1; }
grep -q "^tests_paged: no GPU" "$WORK/out/progress.txt" || { echo "FAIL: the GPU steps did not report 'no GPU'"; rc=1; }
[ $rc -eq 0 ] && echo "GPU machine rehearsal passed" || echo "GPU machine rehearsal FAILED (logs: $WORK/out)"
exit $rc
