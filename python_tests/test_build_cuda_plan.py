"""setup.py's CUDA decision (build_helpers/cuda.py): a CUDA build that cannot compile falls back to the CPU kernels
with the reason, unless ATTNGATE_CUDA=1 makes it an error. nvcc is replaced by a script that behaves like a broken
toolkit (it reports a version, then cannot find a header)."""

from __future__ import annotations

import pathlib
import stat
import sys

import pytest
import torch
from torch.utils import cpp_extension

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from build_helpers import cuda as cuda_plan  # noqa: E402

FAKE_NVCC = """#!/bin/sh
if [ "$1" = "--dryrun" ]; then echo "#$ TOP={top}" >&2; exit 0; fi
if [ "$1" = "--version" ]; then echo "Cuda compilation tools, release {version}, V{version}.1"; exit 0; fi
echo "probe.cu:1:10: fatal error: cuda_runtime.h: No such file or directory" >&2
exit 1
"""


@pytest.fixture
def fake_cuda(tmp_path, monkeypatch):
    def make(version: str, torch_cuda: str = "13.0", cudart: bool = True, top: str = "/nonexistent"):
        home = tmp_path / f"cuda-{version}"
        (home / "bin").mkdir(parents=True)
        if cudart:
            (home / "lib64").mkdir()
            (home / "lib64" / "libcudart.so").write_text("")
        nvcc = home / "bin" / "nvcc"
        nvcc.write_text(FAKE_NVCC.format(version=version, top=top))
        nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
        monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(home))
        monkeypatch.setattr(torch.version, "cuda", torch_cuda)
        monkeypatch.setattr(cpp_extension, "include_paths", lambda device_type="cpu": [])
        return home

    return make


def test_missing_headers_fall_back_to_cpu_with_the_compiler_message(fake_cuda, monkeypatch):
    fake_cuda("13.0")
    monkeypatch.delenv("ATTNGATE_CUDA", raising=False)
    plan = cuda_plan.plan_cuda(str(ROOT / "csrc"), [])
    assert not plan.build
    assert "probe file" in plan.reason and "cuda_runtime.h: No such file or directory" in plan.reason


def test_forced_cuda_with_missing_headers_is_an_error(fake_cuda, monkeypatch):
    fake_cuda("13.0")
    monkeypatch.setenv("ATTNGATE_CUDA", "1")
    with pytest.raises(RuntimeError, match=r"(?s)ATTNGATE_CUDA=1 but the CUDA kernels cannot be built: .*cuda_runtime.h"):
        cuda_plan.plan_cuda(str(ROOT / "csrc"), [])


def test_nvcc_of_another_cuda_major_falls_back(fake_cuda, monkeypatch):
    fake_cuda("12.4", torch_cuda="13.0")
    monkeypatch.delenv("ATTNGATE_CUDA", raising=False)
    plan = cuda_plan.plan_cuda(str(ROOT / "csrc"), [])
    assert not plan.build and plan.reason == "nvcc is CUDA 12.4 but torch was built with CUDA 13.0"


def test_cpu_torch_and_switches(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.delenv("ATTNGATE_CUDA", raising=False)
    plan = cuda_plan.plan_cuda(str(ROOT / "csrc"), [])
    assert not plan.build and "is a CPU build" in plan.reason
    monkeypatch.setenv("ATTNGATE_CUDA", "0")
    assert cuda_plan.plan_cuda(str(ROOT / "csrc"), []).reason == "ATTNGATE_CUDA=0"
    monkeypatch.setenv("ATTNGATE_CUDA", "yes")
    with pytest.raises(RuntimeError, match="ATTNGATE_CUDA must be 0 or 1"):
        cuda_plan.plan_cuda(str(ROOT / "csrc"), [])
    monkeypatch.setenv("ATTNGATE_CUDA", "1")
    with pytest.raises(RuntimeError, match="cannot be built: torch .* is a CPU build"):
        cuda_plan.plan_cuda(str(ROOT / "csrc"), [])


def test_nvcc_wrapper_outside_the_toolkit_builds_with_the_toolkit_it_runs(fake_cuda, tmp_path, monkeypatch):
    # /usr/local/bin/nvcc exec'ing /usr/local/cuda-13.0/bin/nvcc: torch takes /usr/local as CUDA_HOME, which has no
    # libcudart.so to link; the toolkit nvcc reports (its TOP) has.
    toolkit = fake_cuda("13.0")
    wrapper = fake_cuda("13.0-wrapper", cudart=False, top=str(toolkit / "bin" / ".."))
    monkeypatch.delenv("ATTNGATE_CUDA", raising=False)
    cuda_plan.plan_cuda(str(ROOT / "csrc"), [])
    assert cpp_extension.CUDA_HOME == str(toolkit) != str(wrapper)


def test_no_cuda_runtime_falls_back_naming_it(fake_cuda, monkeypatch):
    home = fake_cuda("13.0", cudart=False)
    monkeypatch.delenv("ATTNGATE_CUDA", raising=False)
    plan = cuda_plan.plan_cuda(str(ROOT / "csrc"), [])
    assert not plan.build and plan.reason.startswith(f"no CUDA runtime (libcudart.so) under {home}")
