"""Checks a built attngate_ext wheel: its abi3 tag matches the Py_LIMITED_API the library was compiled for, its
metadata asks for the torch its stable-ABI build needs, and its library carries no debug info.

    python .ci/check_wheel.py dist/attngate_ext-*.whl     (run with the Python/torch that built the wheel)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import zipfile

from torch.utils import cpp_extension

MAX_LIBRARY_BYTES = 4 * 1024 * 1024  # the CPU library is about 1 MB stripped (9.7 MB with debug info)
MAX_CUDA_LIBRARY_BYTES = 32 * 1024 * 1024  # with CUDA kernels: about 7 MB per GPU architecture


def fail(msg: str) -> None:
    print(f"check_wheel: FAIL: {msg}")
    sys.exit(1)


def main(path: str) -> None:
    name = os.path.basename(path)
    limited = int(getattr(cpp_extension, "min_supported_cpython", "0x030A0000"), 16)
    want_tag = f"cp3{(limited >> 16) & 0xFF}-abi3"
    if want_tag not in name:
        fail(f"{name}: tag is not {want_tag} (the library is compiled with Py_LIMITED_API={limited:#010x})")
    with zipfile.ZipFile(path) as whl:
        names = whl.namelist()
        meta = whl.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        build_info = whl.read("attngate_ext/_build_info.py").decode()
        shipped = [n for n in names if n.startswith("attngate_ext/pretrained/") and n.endswith(".safetensors")]
        if not shipped:
            fail("the shipped gates (attngate_ext/pretrained/*/attention_gates.safetensors) are not in the wheel")
        libs = [n for n in names if re.fullmatch(r"attngate_ext/_C\.abi3\.so", n)]
        if len(libs) != 1:
            fail(f"expected attngate_ext/_C.abi3.so in the wheel, found {libs}")
        with tempfile.TemporaryDirectory() as tmp:
            lib = whl.extract(libs[0], tmp)
            size = os.path.getsize(lib)
            sections = subprocess.run(["readelf", "-S", "-W", lib], capture_output=True, text=True, check=True).stdout
            needed = subprocess.run(["readelf", "-d", "-W", lib], capture_output=True, text=True, check=True).stdout
    target = re.search(r"TORCH_TARGET = \((\d+), (\d+)\)", build_info)
    if target is None:
        fail("attngate_ext/_build_info.py has no TORCH_TARGET")
    want_requires = f"Requires-Dist: torch>={target.group(1)}.{target.group(2)}"
    if want_requires not in meta.splitlines():
        fail(f"METADATA lacks '{want_requires}': {[l for l in meta.splitlines() if 'torch' in l]}")
    if f"Requires-Python: >={(limited >> 24) & 0xFF}.{(limited >> 16) & 0xFF}" not in meta.splitlines():
        fail(f"METADATA's Requires-Python does not match Py_LIMITED_API={limited:#010x}")
    if ".debug_" in sections:
        fail("_C.abi3.so carries debug sections: " + ", ".join(sorted(set(re.findall(r"\.debug_\w+", sections)))))
    limit = MAX_CUDA_LIBRARY_BYTES if "CUDA_KERNELS = True" in build_info else MAX_LIBRARY_BYTES
    if size > limit:
        fail(f"_C.abi3.so is {size} bytes (> {limit})")
    for lib_name in ("libtorch_python", "libpython"):
        if lib_name in needed:
            fail(f"_C.abi3.so links {lib_name} (not needed with the limited API and the stable ABI)")
    print(f"check_wheel: {name}: {want_tag}, {want_requires}, _C.abi3.so {size / 1e6:.2f} MB without debug info")


if __name__ == "__main__":
    main(sys.argv[1])
