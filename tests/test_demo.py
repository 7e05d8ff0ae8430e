"""`streamloader demo` end to end: embedded server, synthetic repo, hooks, filter, prefetch, features, training."""
from __future__ import annotations

import os
import re
import subprocess
import sys


def test_demo_runs_every_step(tmp_path):
    env = dict(os.environ)
    env.pop("DAGSHUB_TOKEN", None)
    result = subprocess.run(
        [sys.executable, "-m", "streamloader", "demo", "--images", "80", "--squirrels", "10", "--epochs", "2",
         "--latency", "0", "--workdir", str(tmp_path / "w")],
        capture_output=True, text=True, timeout=240, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for step in ("[1 data]", "[2 serve]", "[3 auth]", "[4 hooks]", "[5 filter]", "[6 prefetch]", "[7 features]",
                 "[8 train]", "done in"):
        assert step in out, f"missing {step}:\n{out}"
    assert "10 of 80 rows matched" in out
    assert re.search(r"\[6 prefetch\] 10 files", out)
    assert "epoch 2/2" in out and "final validation MSE" in out
    assert "demo-" not in out.replace("streamloader-demo-", "")  # the demo token is never printed
    # the cache holds the prefetched images and their features
    assert os.listdir(tmp_path / "w" / "cache" / "objects")
    assert os.path.isdir(tmp_path / "w" / "cache" / "features")
