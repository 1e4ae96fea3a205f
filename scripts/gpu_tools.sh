#!/usr/bin/env bash
# Prepares build/gpu-tools: what the GPU check may lack on a lent GPU machine (no network there) and is small enough
# to carry along: the ninja binary (370 KB), without which torch's extension build falls back to a slow serial
# compile. benchmarks/gpu_check.sh puts build/gpu-tools on PATH when the machine has no ninja of its own.
#
#   bash scripts/gpu_tools.sh        # then carry build/gpu-tools with the call that runs benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=build/gpu-tools
mkdir -p "$DEST"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "ninja>=1.11" 2>/dev/null \
  || { echo "could not download the ninja wheel"; exit 1; }
python3 - "$tmp" "$DEST" <<'PY'
import glob, os, stat, sys, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "ninja-*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("/scripts/ninja") or n.endswith("/bin/ninja"))
    target = os.path.join(sys.argv[2], "ninja")
    with open(target, "wb") as f:
        f.write(z.read(name))
os.chmod(target, os.stat(target).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
PY
"$DEST/ninja" --version >/dev/null && echo "$DEST/ninja $("$DEST/ninja" --version)"
