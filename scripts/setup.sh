#!/usr/bin/env bash
# Install streamloader and its test dependencies into the current Python environment.
# torch is pinned FIRST: an unpinned torch requirement would otherwise pull the newest CUDA build (gigabytes);
# with 2.13.0 present, setup.cfg's torch>=2.1 is already satisfied and nothing more is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[test]"
