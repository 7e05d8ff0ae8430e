"""`streamloader demo` end to end: embedded server, synthetic repo, hooks, filter, prefetch, features, training."""
from __future__ import annotations

import os
import re
import subprocess
import sys


def _demo(workdir):
    env = dict(os.environ)
    env.pop("DAGSHUB_TOKEN", None)
    result = subprocess.run(
        [sys.executable, "-m", "streamloader", "demo", "--images", "80", "--squirrels", "40", "--epochs", "5",
         "--latency", "0", "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=240, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_demo_runs_every_step_and_really_learns(tmp_path):
    out = _demo(tmp_path / "w")
    for step in ("[1 data]", "[2 serve]", "[3 auth]", "[4 hooks]", "[5 filter]", "[6 prefetch]", "[7 features]",
                 "[8 train]", "done in"):
        assert step in out, f"missing {step}:\n{out}"
    assert "40 of 80 rows matched" in out
    assert "brightness" in out  # it says what the data is
    assert "[6 prefetch] 40 images: 40 downloaded (" in out
    assert "epoch 5/5" in out and "final validation MSE" in out
    assert ".md)" not in out  # no pointer to a file the repo does not have
    assert "demo-" not in out.replace("streamloader-demo-", "")  # the demo token is never printed
    baseline = float(re.search(r"predicting the mean score gives validation MSE ([0-9.]+)", out).group(1))
    final = float(re.search(r"final validation MSE ([0-9.]+)", out).group(1))
    assert final < 0.5 * baseline, out  # the scores follow the images: the regressor learns them
    # the cache holds the prefetched images and their features
    assert os.listdir(tmp_path / "w" / "cache" / "objects")
    assert os.path.isdir(tmp_path / "w" / "cache" / "features")
    again = _demo(tmp_path / "w")  # everything cached now
    assert "[6 prefetch] 40 images: 0 downloaded (0 B), 40 already cached" in again
    assert "all 40 feature vectors read from the feature cache" in again and "0/s" not in again
