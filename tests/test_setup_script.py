"""scripts/setup.sh: the default install is unchanged, and the CPU/other-index choice reaches pip's torch install."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "setup.sh"


def _pip_calls(tmp_path, **env):
    """Run setup.sh with PYTHON pointing at a stand-in that records its arguments instead of installing."""
    log = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k not in ("TORCH_INDEX_URL", "STREAMLOADER_TORCH_CPU")}
    subprocess.run(["bash", str(SCRIPT)], check=True, timeout=30, env=dict(base, PYTHON=str(fake), **env))
    return log.read_text().splitlines()


def test_default_pins_torch_first_without_another_index(tmp_path):
    calls = _pip_calls(tmp_path)
    assert calls == ["-m pip install --quiet --disable-pip-version-check torch==2.13.0",
                     "-m pip install --quiet --disable-pip-version-check -e .[test]"]


def test_cpu_build_and_any_index_can_be_chosen(tmp_path):
    (tmp_path / "a").mkdir()
    cpu = _pip_calls(tmp_path / "a", STREAMLOADER_TORCH_CPU="1")
    assert cpu[0].endswith("--index-url https://download.pytorch.org/whl/cpu torch==2.13.0")
    assert "--index-url" not in cpu[1]  # only torch comes from the other index
    (tmp_path / "b").mkdir()
    other = _pip_calls(tmp_path / "b", TORCH_INDEX_URL="https://mirror.example/simple", STREAMLOADER_TORCH_CPU="1")
    assert other[0].endswith("--index-url https://mirror.example/simple torch==2.13.0")
