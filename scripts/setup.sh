#!/usr/bin/env bash
# Install streamloader and its test dependencies into the current Python environment.
# torch is pinned FIRST: an unpinned torch requirement would otherwise pull the newest CUDA build (gigabytes);
# with 2.13.0 present, setup.cfg's torch>=2.1 is already satisfied and nothing more is downloaded.
# Which build of torch==2.13.0 arrives is the package index's choice: this project's machines serve the CPU build,
# while the public PyPI index serves Linux x86_64 the CUDA build (~2.5 GB of nvidia-* wheels). To choose:
#   STREAMLOADER_TORCH_CPU=1 bash scripts/setup.sh        CPU build from PyTorch's index (download.pytorch.org/whl/cpu)
#   TORCH_INDEX_URL=<index URL> bash scripts/setup.sh      torch from that index (e.g. .../whl/cu124 for CUDA 12.4)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
# `streamloader mount` needs libfuse and fusermount3 from the OS (the Python binding, mfusepy, is a pip extra).
if ! command -v fusermount3 >/dev/null 2>&1 || ! ldconfig -p 2>/dev/null | grep -q 'libfuse3\?\.so'; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        { apt-get update -qq && apt-get install -y -qq fuse3 >/dev/null; } \
            || echo "setup.sh: could not install fuse3 with apt-get: streamloader mount and its tests will be unavailable" >&2
    else
        echo "setup.sh: fuse3 is not installed and cannot be installed here (needs root and apt-get): streamloader mount and its tests will be unavailable" >&2
    fi
fi
TORCH_INDEX=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    TORCH_INDEX=(--index-url "$TORCH_INDEX_URL")
elif [ "${STREAMLOADER_TORCH_CPU:-0}" = "1" ]; then
    TORCH_INDEX=(--index-url "https://download.pytorch.org/whl/cpu")
fi
"$PY" -m pip install --quiet --disable-pip-version-check ${TORCH_INDEX[@]+"${TORCH_INDEX[@]}"} "torch==2.13.0"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[test]"
