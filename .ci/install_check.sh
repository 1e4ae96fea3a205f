#!/usr/bin/env bash
# CI stage 4: attngate_ext installs like a package, from this clean clone, on the torch versions users have.
#  a. plain `pip install .` (build isolation: pip builds against its own torch 2.11, the oldest supported) into the
#     venv of the GPU machine's versions (torch 2.11.0 CUDA 13.0, from stage 3); the build must say it was made with
#     torch 2.11 and with the CUDA kernels (nvcc is on this machine), and the op tests run against the installed copy;
#  b. `pip wheel .` builds a wheel the same way, which is checked (tag, metadata, stripped library) and installed
#     next to torch 2.11.0 (stage 3's venv), 2.14.1 (stage 2's venv) and 2.15.0 (the newest release, in a venv of its
#     own; this machine's pip configuration caps torch at 2.14.1, so that one install reads no configuration file),
#     with the op tests run against each installed copy.
# The tests run from a folder outside the clone, so they import the installed package, never the source tree. One
# GPU architecture (TORCH_CUDA_ARCH_LIST=9.0) is enough here: no GPU runs the kernels, stage 2 compiles both.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${INSTALL_CHECK_DIR:-build/install-check}
GPU_VENV=${GPU_VENV:-.venv-gpu}
CUDA_VENV=${CUDA_VENV:-.venv-cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
rm -rf "$WORK"
mkdir -p "$WORK/run"
WORK=$(cd "$WORK" && pwd)
for v in "$GPU_VENV" "$CUDA_VENV"; do [ -x "$v/bin/python" ] || { echo "no venv at $v (stages 2 and 3 make them)"; exit 1; }; done
GPU_VENV=$(cd "$GPU_VENV" && pwd)
CUDA_VENV=$(cd "$CUDA_VENV" && pwd)
OP_TESTS=(test_append_kv.py test_compact_kv.py test_decode_attention.py test_gate_flags.py test_bad_input.py
          test_overlap_checks.py test_paged_append_kv.py test_paged_storage_errors.py test_paged_decode_attention.py
          test_paged_attention_inputs.py test_paged_prefill_attention.py test_paged_decode_step.py
          test_paged_decode_step_errors.py test_paged_kernel_paths.py test_import_checks.py)
run_op_tests() {  # $1: venv, $2: the torch version it must have
  (cd "$WORK/run" && "$1/bin/python" - "$2" <<'PY'
import pathlib, sys, torch, attngate_ext
from attngate_ext import _build_info
assert torch.__version__.startswith(sys.argv[1]), (torch.__version__, sys.argv[1])
where = pathlib.Path(attngate_ext.__file__).resolve()
assert "site-packages" in where.parts, f"imported {where}, not the installed package"
assert attngate_ext.cuda_kernels_available(), "the installed build has no CUDA kernels"
print(f"attngate_ext from {where.parent} | built with torch {_build_info.BUILT_WITH_TORCH} for >= "
      f"{_build_info.TORCH_TARGET} | running torch {torch.__version__}")
PY
  )
  (cd "$WORK/run" && "$1/bin/python" -m pytest -q -p no:cacheprovider --rootdir "$WORK/run" \
     "${OP_TESTS[@]/#/$ROOT/python_tests/}")
}
built_with() {  # $1: venv; prints the torch version the installed attngate_ext was built with
  (cd "$WORK/run" && "$1/bin/python" -c "from attngate_ext import _build_info as b; print(b.BUILT_WITH_TORCH)")
}

echo "-- a. plain pip install . into the venv of torch 2.11.0 (CUDA 13.0)"
"$GPU_VENV/bin/pip" uninstall -q -y attngate_ext 2>/dev/null || true
t0=$(date +%s)
"$GPU_VENV/bin/pip" install -q "$ROOT"
echo "pip install . took $(( $(date +%s) - t0 )) s"
case "$(built_with "$GPU_VENV")" in 2.11.*) ;; *) echo "FAIL: pip install . did not build against torch 2.11"; exit 1 ;; esac
run_op_tests "$GPU_VENV" 2.11.0
"$GPU_VENV/bin/pip" uninstall -q -y attngate_ext

echo "-- b. pip wheel . (against torch 2.11), installed next to torch 2.11.0, 2.14.1 and 2.15.0"
t0=$(date +%s)
"$GPU_VENV/bin/pip" wheel -q --no-deps -w "$WORK/dist" "$ROOT"
echo "pip wheel . took $(( $(date +%s) - t0 )) s"
wheel=$(ls "$WORK"/dist/attngate_ext-*.whl)
"$GPU_VENV/bin/python" .ci/check_wheel.py "$wheel"
python3 -m venv "$WORK/venv-215"
"$WORK/venv-215/bin/pip" install -q --upgrade pip
PIP_CONFIG_FILE=/dev/null "$WORK/venv-215/bin/pip" install -q torch==2.15.0 pytest
for pair in "$GPU_VENV:2.11.0" "$CUDA_VENV:2.14.1" "$WORK/venv-215:2.15.0"; do
  venv=${pair%:*} version=${pair##*:}
  echo "-- the wheel next to torch $version"
  "$venv/bin/pip" uninstall -q -y attngate_ext 2>/dev/null || true
  # With its requirements (torch >= 2.11 is there already); the cap of this machine's configuration would refuse
  # the venv's own torch 2.15.0, so no configuration file is read.
  PIP_CONFIG_FILE=/dev/null "$venv/bin/pip" install -q "$wheel" pytest
  case "$(built_with "$venv")" in 2.11.*) ;; *) echo "FAIL: the wheel was not built against torch 2.11"; exit 1 ;; esac
  run_op_tests "$venv" "$version"
  "$venv/bin/pip" uninstall -q -y attngate_ext
done
echo "install check passed"
