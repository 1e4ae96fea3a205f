"""What `import attngate_ext` checks before and after loading attngate_ext._C (attngate_ext/_extension.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import attngate_ext
from attngate_ext import _build_info, _extension


def _run(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "version, expected",
    [("2.13.0+cpu", (2, 13)), ("2.14.1", (2, 14)), ("2.15.0.dev20270101+cu130", (2, 15)), ("3.0", (3, 0))],
)
def test_torch_version_is_read_as_major_minor(version, expected):
    assert _extension.torch_version(version) == expected


def test_unreadable_torch_version_is_an_import_error():
    with pytest.raises(ImportError, match="cannot read the torch version 'nightly'"):
        _extension.torch_version("nightly")


def test_older_torch_is_refused_naming_both_versions():
    with pytest.raises(ImportError, match=r"needs torch >= 2\.11 .* but torch 2\.10\.1\+cpu is installed"):
        _extension.check_torch_version("2.10.1+cpu", (2, 11))
    _extension.check_torch_version("2.11.0+cu130", (2, 11))
    _extension.check_torch_version("2.14.1", (2, 11))


def test_the_build_targets_torch_2_11():
    # The GPU machines run torch 2.11: a build that targets a later stable ABI would not load there.
    assert tuple(_build_info.TORCH_TARGET) == (2, 11)


def test_import_under_an_older_torch_fails_before_loading_the_library():
    result = _run(
        """
        import sys, torch
        torch.__version__ = "2.10.1+cpu"
        try:
            import attngate_ext
        except ImportError as exc:
            print("IMPORT_ERROR:", exc)
        print("LOADED" if "attngate_ext._C" in sys.modules else "NOT_LOADED")
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    target = "%d.%d" % _build_info.TORCH_TARGET
    assert f"needs torch >= {target}" in result.stdout and "torch 2.10.1+cpu is installed" in result.stdout
    assert "NOT_LOADED" in result.stdout


def test_missing_build_says_how_to_build():
    result = _run(
        """
        import sys
        sys.modules["attngate_ext._build_info"] = None  # as in a source tree where setup.py never ran
        try:
            import attngate_ext
        except ImportError as exc:
            print("IMPORT_ERROR:", exc)
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "attngate_ext._C is not built" in result.stdout and "pip install ." in result.stdout


def test_build_info_describes_the_loaded_library():
    assert _build_info.CUDA_KERNELS == attngate_ext.cuda_kernels_available()
    assert _extension.torch_version(torch.__version__) >= tuple(_build_info.TORCH_TARGET)
    assert _extension.torch_version(_build_info.BUILT_WITH_TORCH) >= tuple(_build_info.TORCH_TARGET)


def test_a_namespace_taken_before_the_import_is_a_clear_import_error():
    # Another library owning the attngate namespace makes the C registration fail. torch >= 2.13 hands over its own
    # message; torch 2.11 and 2.12 have no shim function for it, and the library says so instead (a weak symbol).
    result = _run(
        """
        import torch
        taken = torch.library.Library("attngate", "DEF")
        try:
            import attngate_ext
        except ImportError as exc:
            print("IMPORT_ERROR:", exc)
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "IMPORT_ERROR:" in result.stdout and "cannot register the torch.ops.attngate operators" in result.stdout
    if _extension.torch_version(torch.__version__) >= (2, 13):
        assert "torch says: " in result.stdout and "does not give the message" not in result.stdout
    else:
        assert "torch says: (torch < 2.13 does not give the message)" in result.stdout
