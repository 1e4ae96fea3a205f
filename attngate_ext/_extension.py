"""Loads the compiled ``attngate_ext._C`` (which registers ``torch.ops.attngate.*``) with clear errors.

* A torch older than the one the extension was built for (its stable-ABI target) is refused before the library is
  loaded, with both versions named (instead of an undefined-symbol error).
* A second registration of the ``attngate`` operators in one process (the CMake build ``libattngate_ops.so`` loaded
  with ``torch.ops.load_library`` first) is an ImportError saying what to do, never an abort.
* A build with CUDA kernels under a CPU build of torch (which lacks the CUDA libraries they link) says so.
* A build without its CUDA kernels on a machine with a GPU warns once, with the reason the build recorded.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Tuple

import torch

NOT_BUILT = (
    "attngate_ext._C is not built. Install the package with `pip install .` (or, reusing the torch already "
    "installed, `pip install --no-build-isolation .`) from the repository root."
)


def torch_version(version: str) -> Tuple[int, int]:
    """(major, minor) of a torch version string such as '2.13.0+cpu' or '2.14.0.dev20260101'."""
    parts = version.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise ImportError(f"attngate_ext cannot read the torch version {version!r}") from None


def check_torch_version(installed: str, target: Tuple[int, int]) -> None:
    """Raises ImportError when the installed torch is older than the build's stable-ABI target."""
    if torch_version(installed) < tuple(target):
        raise ImportError(
            f"attngate_ext needs torch >= {target[0]}.{target[1]} (it was built for torch's stable ABI of "
            f"{target[0]}.{target[1]}), but torch {installed} is installed. Upgrade torch: "
            f"pip install 'torch>={target[0]}.{target[1]}'."
        )


def load() -> None:
    try:
        build_info = importlib.import_module("attngate_ext._build_info")
    except ImportError as exc:
        raise ImportError(NOT_BUILT) from exc
    check_torch_version(torch.__version__, build_info.TORCH_TARGET)
    try:
        importlib.import_module("attngate_ext._C")
    except ImportError as exc:
        if "cannot register the torch.ops.attngate operators" in str(exc):
            raise ImportError(
                f"{exc}\nThe attngate operators can be registered once per process: the CMake build "
                "(libattngate_ops.so, loaded with torch.ops.load_library) and this package register the same "
                "operators from the same sources. Use one of the two: `import attngate_ext` alone gives the "
                "operators and the Python API."
            ) from None
        if build_info.CUDA_KERNELS and torch.version.cuda is None:
            raise ImportError(
                f"attngate_ext was built with its CUDA kernels (against torch {build_info.BUILT_WITH_TORCH}), which "
                f"need a CUDA build of torch, but torch {torch.__version__} is a CPU build. Reinstall attngate_ext "
                f"with ATTNGATE_CUDA=0 for the CPU kernels only, or install a CUDA build of torch. ({exc})"
            ) from exc
        raise ImportError(f"{NOT_BUILT} (loading it failed: {exc})") from exc
    if not build_info.CUDA_KERNELS and torch.cuda.is_available():
        warnings.warn(
            "attngate_ext was built without its CUDA kernels, so its ops take CPU tensors only "
            f"(build: {build_info.CUDA_REASON}). Rebuild with ATTNGATE_CUDA=1 to see what is missing.",
            RuntimeWarning,
            stacklevel=3,
        )
