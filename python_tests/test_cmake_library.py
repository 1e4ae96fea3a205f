"""The CMake build of the same sources loads with torch.ops.load_library and computes what the references do.

The library is built into build/cmake-test (or taken from $ATTNGATE_CMAKE_LIB, which .ci/run sets after its own
CMake build). Each check runs in a subprocess, since the library registers the `attngate` operators too: one process
holds one registration. Loading both the library and attngate_ext in one process, in either order, must never abort:
the package's import raises a clear ImportError, or the library leaves the package's operators in place.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]

CHECK_SCRIPT = textwrap.dedent(
    """
    import importlib.util, sys, torch
    torch.ops.load_library(sys.argv[1])
    spec = importlib.util.spec_from_file_location("reference", sys.argv[2])
    reference = importlib.util.module_from_spec(spec); spec.loader.exec_module(reference)
    ops = torch.ops.attngate
    g = torch.Generator().manual_seed(0)
    kc, vc = torch.randn(2, 3, 16, 8, generator=g), torch.randn(2, 3, 16, 8, generator=g)
    lengths = torch.tensor([[1, 0, 4], [2, 2, 2]], dtype=torch.int32)
    key, value = torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 3, 5, 8, generator=g)
    keep = torch.rand(2, 3, 5, generator=g) > 0.5
    ref = [kc.clone(), vc.clone(), lengths.clone()]
    ops.append_kv_(kc, vc, lengths, key, value, keep)
    reference.append_kv_(*ref, key, value, keep)
    assert torch.equal(lengths, ref[2])
    prune = torch.rand(2, 3, 16, generator=g) > 0.5
    ops.compact_kv_(kc, vc, lengths, prune)
    reference.compact_kv_(*ref, prune)
    assert torch.equal(lengths, ref[2])
    q = torch.randn(2, 6, 8, generator=g)
    torch.testing.assert_close(ops.decode_attention(q, kc, vc, lengths, 0.3), reference.decode_attention(q, *ref, 0.3))
    x, w = torch.randn(2, 7, 4, generator=g), torch.randn(3, 4, generator=g)
    probs, flags = ops.gate_flags(x, w, None, 0.5, 2, 0, None)
    torch.testing.assert_close(probs, reference.gate_flags(x, w, None, 0.5, 2, 0, None)[0])
    print("CMAKE_LIBRARY_OK")
    """
)


def _library_path() -> pathlib.Path:
    given = os.environ.get("ATTNGATE_CMAKE_LIB")
    if given:
        return pathlib.Path(given)
    cmake = shutil.which("cmake")
    assert cmake is not None, "cmake is needed to build the CMake library (apt-get install cmake)"
    build = ROOT / "build" / "cmake-test"
    subprocess.run(
        [cmake, "-S", str(ROOT), "-B", str(build), "-DATTNGATE_CUDA=OFF",
         f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
        check=True, capture_output=True,
    )
    subprocess.run([cmake, "--build", str(build), "-j", "2"], check=True, capture_output=True)
    return build / "libattngate_ops.so"


def test_cmake_library_loads_and_matches_reference():
    lib = _library_path()
    assert lib.is_file(), f"CMake did not produce {lib}"
    result = subprocess.run(
        [sys.executable, "-c", CHECK_SCRIPT, str(lib), str(ROOT / "attngate_ext" / "ops" / "reference.py")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CMAKE_LIBRARY_OK" in result.stdout


BOTH_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    lib, order = sys.argv[1], sys.argv[2]
    if order == "library_first":
        torch.ops.load_library(lib)
        try:
            import attngate_ext
        except ImportError as exc:
            print("IMPORT_ERROR:", exc)
        else:
            print("IMPORTED")
    else:
        import attngate_ext
        torch.ops.load_library(lib)
        kc, vc = torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2)
        lengths = torch.zeros(1, 1, dtype=torch.int32)
        torch.ops.attngate.append_kv_(kc, vc, lengths, torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2), None)
        print("OPS_WORK", lengths.item(), attngate_ext.cuda_kernels_available() in (True, False))
    """
)


def _run_both(order: str) -> subprocess.CompletedProcess:
    lib = _library_path()
    return subprocess.run([sys.executable, "-c", BOTH_SCRIPT, str(lib), order], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_library_then_import_raises_a_clear_import_error():
    result = _run_both("library_first")
    assert result.returncode == 0, f"exit code {result.returncode} (negative: killed by a signal)\n{result.stderr[-3000:]}"
    assert "IMPORT_ERROR:" in result.stdout, result.stdout + result.stderr[-2000:]
    message = result.stdout
    assert "cannot register the torch.ops.attngate operators" in message
    assert "libattngate_ops.so" in message  # names the library that registered first
    assert "Use one of the two" in message


def test_import_then_library_keeps_the_registered_ops():
    result = _run_both("package_first")
    assert result.returncode == 0, f"exit code {result.returncode} (negative: killed by a signal)\n{result.stderr[-3000:]}"
    assert "OPS_WORK 3 True" in result.stdout, result.stdout + result.stderr[-2000:]
    assert "the operators registered first stay in use" in result.stderr
