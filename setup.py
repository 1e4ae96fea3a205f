"""Builds attngate_ext._C: the CPU kernels always, the CUDA kernels when they can be built.

Build switches (environment variables):
  ATTNGATE_CUDA=1|0     force the CUDA kernels on (error if impossible) or off; unset = auto (torch has CUDA
                        and nvcc is found through CUDA_HOME / PATH).
  TORCH_CUDA_ARCH_LIST  GPU architectures to compile for; default "8.0;9.0" (A100, H100/H200).
  MAX_JOBS              parallel compile jobs; default 2 (the development machines have 2 cores).
  ATTNGATE_DEBUG=1      -O0 -g host code, -lineinfo device code.
"""

from __future__ import annotations

import glob
import os
import sys

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def _say(msg: str) -> None:
    print(f"[attngate_ext build] {msg}", file=sys.stderr, flush=True)


def _want_cuda() -> bool:
    forced = os.environ.get("ATTNGATE_CUDA")
    have_torch_cuda = torch.version.cuda is not None
    have_nvcc = cpp_extension.CUDA_HOME is not None
    if forced == "0":
        _say("ATTNGATE_CUDA=0: building CPU kernels only")
        return False
    if forced == "1":
        if not (have_torch_cuda and have_nvcc):
            raise RuntimeError(
                "ATTNGATE_CUDA=1 but the CUDA kernels cannot be built: "
                f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"
            )
        _say("ATTNGATE_CUDA=1: building CPU and CUDA kernels")
        return True
    if forced not in (None, ""):
        raise RuntimeError(f"ATTNGATE_CUDA must be 0 or 1, got {forced!r}")
    decision = have_torch_cuda and have_nvcc
    _say(
        f"auto: torch CUDA {torch.version.cuda}, nvcc at {cpp_extension.CUDA_HOME} -> "
        + ("building CPU and CUDA kernels" if decision else "building CPU kernels only")
    )
    return decision


def _extension():
    with_cuda = _want_cuda()
    debug = os.environ.get("ATTNGATE_DEBUG") == "1"
    os.environ.setdefault("MAX_JOBS", "2")
    # csrc/*.cpp includes python_module.cpp (PyInit__C), which the CMake library leaves out.
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    # No -std flag: torch.utils.cpp_extension adds the standard its headers need (C++17 up to 2.13, C++20 after).
    cxx += ["-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-psabi", "-fopenmp"]
    extra = {"cxx": cxx}
    macros = []  # py_limited_api=True makes BuildExtension define Py_LIMITED_API itself
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        _say(f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extra["nvcc"] = [
            "-O3",
            "--expt-relaxed-constexpr",
            "-Xptxas=-v,-warn-spills",
            "-Xcompiler=-Wall",
        ] + (["-lineinfo"] if debug else [])
        macros.append(("ATTNGATE_WITH_CUDA", "1"))
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    return ext_cls(
        name="attngate_ext._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        define_macros=macros,
        py_limited_api=True,
    )


setup(
    packages=find_packages(include=["attngate_ext", "attngate_ext.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
