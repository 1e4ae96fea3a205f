"""Whether setup.py builds the CUDA kernels, decided so that a CUDA build that cannot compile never fails the install.

``ATTNGATE_CUDA=0`` builds the CPU kernels only. ``ATTNGATE_CUDA=1`` requires the CUDA kernels: anything missing is an
error naming it. Unset (auto), the CUDA kernels are built when torch is a CUDA build, nvcc is found (``CUDA_HOME`` or
``PATH``), its CUDA major version is torch's, and a probe file that includes every header the kernels include
compiles; otherwise the build falls back to the CPU kernels and prints why.

The headers the kernels need (``cuda_runtime.h``, ``cuda_fp16.h``, ``cuda_bf16.h``) come with nvcc. The ``nvidia``
wheels of a CUDA build of torch carry them too; their include folders are searched after nvcc's own
(``-idirafter``), so a toolkit that lacks a header still builds.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import List, Optional

PROBE_SOURCE = '#include "cuda/cuda_utils.cuh"\n#include "dispatch.h"\n__global__ void attngate_probe() {}\n'


@dataclass
class CudaPlan:
    build: bool
    reason: str  # why the CUDA kernels are (not) built
    nvidia_include_dirs: List[str] = field(default_factory=list)


def say(msg: str) -> None:
    print(f"[attngate_ext build] {msg}", file=sys.stderr, flush=True)


def nvidia_include_dirs() -> List[str]:
    """Include folders of the ``nvidia`` wheels next to torch (``site-packages/nvidia/*/include``)."""
    import torch

    site = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    return sorted(d for d in glob.glob(os.path.join(site, "nvidia", "*", "include")) if os.path.isdir(d))


def _nvcc_version(nvcc: str) -> Optional[str]:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def _probe(nvcc: str, flags: List[str], include_dirs: List[str], extra_dirs: List[str]) -> Optional[str]:
    """Compiles PROBE_SOURCE with nvcc; returns None when it compiles, else the end of nvcc's output."""
    with tempfile.TemporaryDirectory(prefix="attngate-cuda-probe-") as tmp:
        src = os.path.join(tmp, "probe.cu")
        with open(src, "w") as f:
            f.write(PROBE_SOURCE)
        cmd = [nvcc, "-c", src, "-o", os.path.join(tmp, "probe.o"), "-std=c++20", *flags]
        cmd += [f"-I{d}" for d in include_dirs] + [f"-Xcompiler=-idirafter{d}" for d in extra_dirs]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as exc:
            return str(exc)
        if result.returncode == 0:
            return None
        return "\n".join((result.stdout + result.stderr).strip().splitlines()[-6:])


def _has_cudart(home: str) -> bool:
    return any(os.path.exists(os.path.join(home, lib, "libcudart.so")) for lib in ("lib64", "lib"))


def _toolkit_root(nvcc: str) -> Optional[str]:
    """The toolkit folder nvcc itself uses (its ``TOP``), found through wrapper scripts such as a
    ``/usr/local/bin/nvcc`` that execs ``/usr/local/cuda-X/bin/nvcc``; None when nvcc does not say."""
    with tempfile.TemporaryDirectory(prefix="attngate-cuda-top-") as tmp:
        src = os.path.join(tmp, "empty.cu")
        open(src, "w").close()
        try:
            out = subprocess.run([nvcc, "--dryrun", "-c", src], capture_output=True, text=True, timeout=60, cwd=tmp)
        except (OSError, subprocess.SubprocessError):
            return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(match.group(1).strip()) if match else None


def _resolve_cuda_home() -> None:
    """torch takes the folder above ``bin/nvcc`` as CUDA_HOME. When nvcc on PATH is a wrapper outside the toolkit, that
    folder has no CUDA runtime to link against (``-lcudart`` fails); use the toolkit nvcc names instead."""
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home is None or _has_cudart(home):
        return
    root = _toolkit_root(os.path.join(home, "bin", "nvcc"))
    if root is not None and root != home and _has_cudart(root):
        say(f"{home}/bin/nvcc runs the toolkit at {root}: building with CUDA_HOME={root}")
        cpp_extension.CUDA_HOME = root


def plan_cuda(csrc: str, flags: List[str]) -> CudaPlan:
    """Decides whether to build the CUDA kernels (see the module docstring); raises only for ATTNGATE_CUDA=1."""
    import torch
    from torch.utils import cpp_extension

    forced = os.environ.get("ATTNGATE_CUDA", "")
    if forced not in ("", "0", "1"):
        raise RuntimeError(f"ATTNGATE_CUDA must be 0 or 1 (or unset for auto), got {forced!r}")
    if forced == "0":
        return CudaPlan(False, "ATTNGATE_CUDA=0")
    extra = nvidia_include_dirs() if torch.version.cuda else []
    if torch.version.cuda:
        _resolve_cuda_home()
    reason = None
    nvcc = None
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU build"
    elif cpp_extension.CUDA_HOME is None:
        reason = "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    else:
        nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
        version = _nvcc_version(nvcc)
        if version is None:
            reason = f"{nvcc} did not report its version"
        elif version.split(".")[0] != torch.version.cuda.split(".")[0]:
            reason = f"nvcc is CUDA {version} but torch was built with CUDA {torch.version.cuda}"
        elif not _has_cudart(cpp_extension.CUDA_HOME):
            reason = f"no CUDA runtime (libcudart.so) under {cpp_extension.CUDA_HOME}/lib64 or lib (set CUDA_HOME)"
    if reason is None:
        include_dirs = [csrc] + cpp_extension.include_paths(device_type="cuda")
        error = _probe(nvcc, flags, include_dirs, extra)
        if error is not None:
            reason = f"a probe file including the kernels' headers does not compile with {nvcc}:\n{error}"
    if reason is None:
        return CudaPlan(True, f"torch CUDA {torch.version.cuda}, nvcc at {cpp_extension.CUDA_HOME}", extra)
    if forced == "1":
        raise RuntimeError(f"ATTNGATE_CUDA=1 but the CUDA kernels cannot be built: {reason}")
    return CudaPlan(False, reason)
