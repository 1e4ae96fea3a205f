"""Builds attngate_ext._C: the CPU kernels always, the CUDA kernels when they can be built.

The kernels use only torch's stable ABI (csrc/stable_api.h) with TORCH_TARGET_VERSION = TORCH_TARGET below, and
Python's limited API, so one build loads in every torch >= TORCH_TARGET and every CPython >= 3.10.

Build switches (environment variables):
  ATTNGATE_CUDA=1|0     force the CUDA kernels on (error if impossible) or off; unset = auto: built when torch is a
                        CUDA build, nvcc is found (CUDA_HOME / PATH) and a probe compiles, else the CPU kernels
                        only, with a printed reason (see build_helpers/cuda.py).
  TORCH_CUDA_ARCH_LIST  GPU architectures to compile for; default "8.0;9.0" (A100, H100/H200).
  MAX_JOBS              parallel compile jobs; default 2 (the development machines have 2 cores).
  ATTNGATE_DEBUG=1      -O0 -g host code, -lineinfo device code, debug info kept (stripped otherwise).

Objects are kept in build/temp.<python>-torch<version>-<cpu|cuda>-<torch location>/, so a rebuild
(scripts/bootstrap.sh, an editable install) recompiles only what changed; pip's isolated builds use a temporary folder.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from build_helpers.cuda import plan_cuda, say  # noqa: E402

# The oldest torch the extension supports: the stable-ABI target. Keep in step with pyproject.toml.
TORCH_TARGET = (2, 11)
TORCH_TARGET_HEX = f"0x{TORCH_TARGET[0]:02x}{TORCH_TARGET[1]:02x}000000000000"


def _torch_version() -> tuple:
    return tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])


def _check_build_torch() -> None:
    if _torch_version() < TORCH_TARGET:
        raise RuntimeError(
            f"attngate_ext needs torch >= {TORCH_TARGET[0]}.{TORCH_TARGET[1]} to build (its stable-ABI headers); "
            f"the build environment has torch {torch.__version__}"
        )


def _build_info(cuda_built: bool, cuda_reason: str) -> str:
    """attngate_ext/_build_info.py: what this build is, read at import (torch version check, CUDA warning)."""
    return (
        '"""Written by setup.py next to the library it describes: what this build of attngate_ext._C is."""\n\n'
        f"TORCH_TARGET = {TORCH_TARGET!r}  # the oldest torch it loads in (stable-ABI target)\n"
        f"BUILT_WITH_TORCH = {torch.__version__!r}\n"
        f"CUDA_KERNELS = {cuda_built!r}\n"
        f"CUDA_REASON = {cuda_reason!r}  # why the CUDA kernels were (not) built\n"
    )


def _extension():
    _check_build_torch()
    debug = os.environ.get("ATTNGATE_DEBUG") == "1"
    os.environ.setdefault("MAX_JOBS", "2")
    target = f"-DTORCH_TARGET_VERSION={TORCH_TARGET_HEX}"
    # csrc/*.cpp includes python_module.cpp (PyInit__C); csrc/cmake/ holds what only the CMake library builds.
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    # No -std flag: torch.utils.cpp_extension adds the standard its headers need.
    cxx += ["-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-psabi", target]
    extra = {"cxx": cxx}
    link = [] if debug else ["-Wl,--strip-debug"]
    macros = []  # py_limited_api=True makes BuildExtension define Py_LIMITED_API itself
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    # USE_CUDA declares the stable C API's CUDA functions (torch_c10_cuda_check_msg, ...).
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-Xptxas=-v,-warn-spills", "-Xcompiler=-Wall", target, "-DUSE_CUDA"]
    nvcc += ["-lineinfo"] if debug else []
    plan = plan_cuda(os.path.join(HERE, "csrc"), nvcc)
    if plan.build:
        say(f"building CPU and CUDA kernels ({plan.reason}); TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extra["nvcc"] = nvcc + [f"-Xcompiler=-idirafter{d}" for d in plan.nvidia_include_dirs]
        extra["cxx"] += ["-DUSE_CUDA"] + [f"-idirafter{d}" for d in plan.nvidia_include_dirs]
        macros.append(("ATTNGATE_WITH_CUDA", "1"))
        ext_cls = cpp_extension.CUDAExtension
    else:
        if plan.reason != "ATTNGATE_CUDA=0" and torch.version.cuda is not None:
            say(f"WARNING: the CUDA kernels are not built, CPU kernels only: {plan.reason}. "
                "Set ATTNGATE_CUDA=1 to make this an error.")
        else:
            say(f"building CPU kernels only ({plan.reason})")
        ext_cls = cpp_extension.CppExtension
    ext = ext_cls(
        name="attngate_ext._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args=extra,
        extra_link_args=link,
        define_macros=macros,
        py_limited_api=True,
    )
    ext.build_info = _build_info(plan.build, plan.reason)
    return ext, plan.build


class BuildExt(cpp_extension.BuildExtension):
    """BuildExtension with a persistent object folder (incremental rebuilds, editable installs included) that writes
    _build_info.py next to the library."""

    def finalize_options(self):
        super().finalize_options()
        if "build_temp" in self.distribution.get_option_dict("build_ext"):
            return  # given on the command line (build_ext -t DIR)
        torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
        if "pip-build-env-" in torch_dir:
            return  # pip's isolated build environment is deleted afterwards: its objects could never be reused
        where = hashlib.sha1(torch_dir.encode()).hexdigest()[:8]  # one folder per torch installation
        tag = f"{sys.implementation.cache_tag}-torch{torch.__version__}-{'cuda' if WITH_CUDA else 'cpu'}-{where}"
        self.build_temp = os.path.join(HERE, "build", f"temp.{tag}")

    def run(self):
        # setuptools clears self.inplace while it builds into build/lib, then copies the library into the source tree
        # (`build_ext --inplace`); an editable install puts it there too. Either way _build_info.py goes along.
        self._to_source = bool(self.inplace) or bool(getattr(self, "editable_mode", False))
        super().run()

    def build_extension(self, ext):
        super().build_extension(ext)
        folders = {os.path.dirname(self.get_ext_fullpath(ext.name))}
        if getattr(self, "_to_source", False) or self.inplace:  # the library ends up in the source tree
            folders.add(self.get_finalized_command("build_py").get_package_dir("attngate_ext"))
        for folder in folders:
            path = os.path.join(folder, "_build_info.py")
            if not os.path.exists(path) or open(path).read() != ext.build_info:
                with open(path, "w") as f:
                    f.write(ext.build_info)


def _limited_api_tag() -> str:
    """The wheel's abi3 tag: the CPython version whose limited API BuildExtension compiles against."""
    hexversion = int(getattr(cpp_extension, "min_supported_cpython", "0x030A0000"), 16)
    return f"cp3{(hexversion >> 16) & 0xFF}"


EXTENSION, WITH_CUDA = _extension()

setup(
    packages=find_packages(include=["attngate_ext", "attngate_ext.*"]),
    # The shipped trained gates (attngate_ext.pretrained_gates): weights, config, thresholds and card.
    package_data={"attngate_ext": ["pretrained/*/*.safetensors", "pretrained/*/*.json", "pretrained/*/README.md"]},
    ext_modules=[EXTENSION],
    cmdclass={"build_ext": BuildExt},
    options={"bdist_wheel": {"py_limited_api": _limited_api_tag()}},
)
