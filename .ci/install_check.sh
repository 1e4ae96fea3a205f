#!/usr/bin/env bash
# CI stage 3: attngate_ext installs like a package, from this clean clone.
#  a. plain `pip install .` (build isolation: pip builds against its own torch 2.13) into a fresh venv that has the
#     CPU torch 2.13.0 preinstalled, then the op tests run against the installed package;
#  b. `pip wheel .` builds a wheel (built against torch 2.13), which is checked (tag, metadata, stripped library)
#     and installed next to torch 2.14.1 (the CUDA 13.0 build in $CUDA_VENV, from stage 2), where the op tests run.
# The tests run from a folder outside the clone, so they import the installed package, never the source tree.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${INSTALL_CHECK_DIR:-build/install-check}
CUDA_VENV=${CUDA_VENV:-.venv-cuda}
rm -rf "$WORK"
mkdir -p "$WORK/run"
WORK=$(cd "$WORK" && pwd)
OP_TESTS=(test_append_kv.py test_compact_kv.py test_decode_attention.py test_gate_flags.py test_bad_input.py
          test_overlap_checks.py test_paged_storage.py test_paged_storage_errors.py test_paged_attention.py
          test_paged_attention_inputs.py test_paged_attention_prefill.py test_paged_decode_step.py
          test_import_checks.py)
run_op_tests() {  # $1: venv
  (cd "$WORK/run" && "$1/bin/python" - <<'PY'
import pathlib, sys, torch, attngate_ext
where = pathlib.Path(attngate_ext.__file__).resolve()
assert "site-packages" in where.parts, f"imported {where}, not the installed package"
print(f"attngate_ext from {where.parent} | torch {torch.__version__} | CUDA kernels {attngate_ext.cuda_kernels_available()}")
PY
  )
  (cd "$WORK/run" && "$1/bin/python" -m pytest -q -p no:cacheprovider --rootdir "$WORK/run" \
     "${OP_TESTS[@]/#/$ROOT/python_tests/}")
}

echo "-- a. plain pip install . into a fresh venv with torch 2.13.0 (CPU)"
python3 -m venv "$WORK/venv-213"
"$WORK/venv-213/bin/pip" install -q --upgrade pip
"$WORK/venv-213/bin/pip" install -q torch==2.13.0 pytest
t0=$(date +%s)
"$WORK/venv-213/bin/pip" install -q "$ROOT"
echo "pip install . took $(( $(date +%s) - t0 )) s"
"$WORK/venv-213/bin/python" -c 'import torch; assert torch.__version__.startswith("2.13.0"), torch.__version__'
run_op_tests "$WORK/venv-213"

echo "-- b. pip wheel . (against torch 2.13), installed next to torch 2.14.1"
t0=$(date +%s)
"$WORK/venv-213/bin/pip" wheel -q --no-deps -w "$WORK/dist" "$ROOT"
echo "pip wheel . took $(( $(date +%s) - t0 )) s"
wheel=$(ls "$WORK"/dist/attngate_ext-*.whl)
"$WORK/venv-213/bin/python" .ci/check_wheel.py "$wheel"
[ -x "$CUDA_VENV/bin/python" ] || { echo "no torch 2.14.1 venv at $CUDA_VENV (stage 2 makes it)"; exit 1; }
CUDA_VENV=$(cd "$CUDA_VENV" && pwd)
"$CUDA_VENV/bin/pip" uninstall -q -y attngate_ext 2>/dev/null || true
"$CUDA_VENV/bin/pip" install -q "$wheel" pytest  # with the wheel's requirements (torch>=2.13: 2.14.1 is there)
"$CUDA_VENV/bin/python" -c 'import torch; assert torch.__version__.startswith("2.14.1"), torch.__version__'
run_op_tests "$CUDA_VENV"
"$CUDA_VENV/bin/pip" uninstall -q -y attngate_ext
echo "install check passed"
