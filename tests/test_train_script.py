"""scripts/train_aesthetic.py end to end against the local server, and the training functions behind it."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from conftest import TOKEN
from streamloader.data.train import AestheticMLP, run_aesthetic_demo, train_regressor
from streamloader.synthetic import make_laion_repo

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train_aesthetic.py"
EPOCH_LINE = re.compile(r"^epoch (\d)/3  train_loss (\d+\.\d+)  valid_loss (\d+\.\d+)", re.MULTILINE)


def _run_script(*args, env=None):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=180, env=env)


def test_script_trains_against_the_server_and_reruns_from_the_cache(tmp_path, make_server):
    repo = make_laion_repo(tmp_path / "repo", n_images=30, n_squirrel=10, image_size=(16, 16))
    srv = make_server(repo.root, token=TOKEN)
    env = dict(os.environ, DAGSHUB_TOKEN=TOKEN)
    args = ["--repo-url", srv.repo_url, "--branch", "main", "--keyword", "squirrel", "--epochs", "3", "--limit", "8",
            "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    first = _run_script(*args, env=env)
    assert first.returncode == 0, first.stderr
    epochs = EPOCH_LINE.findall(first.stdout)
    assert [e[0] for e in epochs] == ["1", "2", "3"]
    assert all(math.isfinite(float(e[2])) for e in epochs)
    assert "split: 6 train / 2 valid" in first.stdout
    assert "8 computed" in first.stdout
    assert srv.request_count(kind="raw") == 9  # labels.tsv + 8 images, each once

    srv.reset_counts()
    second = _run_script(*args, env=env)
    assert second.returncode == 0, second.stderr
    assert "8 cached, 0 computed" in second.stdout
    assert srv.request_count(kind="raw") == 0  # features from the cache: no image downloaded
    assert EPOCH_LINE.findall(second.stdout) == epochs  # same seed, same features: the same run


def test_script_without_a_token_fails_clearly(tmp_path, make_server):
    repo = make_laion_repo(tmp_path / "repo", n_images=4, n_squirrel=2, image_size=(8, 8))
    srv = make_server(repo.root, token=TOKEN)
    env = {k: v for k, v in os.environ.items() if k != "DAGSHUB_TOKEN"}
    run = _run_script("--repo-url", srv.repo_url, "--epochs", "1", "--quiet", env=env)
    assert run.returncode == 1
    assert "DAGSHUB_TOKEN" in run.stderr and "Traceback" not in run.stderr


def test_demo_on_local_files(tmp_path):
    repo = make_laion_repo(tmp_path / "repo", n_images=20, n_squirrel=5, image_size=(16, 16))
    seen = []
    result = run_aesthetic_demo(str(repo.labels_path), str(repo.root / "data"), keywords="squirrel", epochs=2,
                                cache_dir=str(tmp_path / "cache"), progress=False, on_epoch=seen.append)
    assert [s.epoch for s in seen] == [1, 2] and result.train.history == seen
    assert (result.train_size, result.valid_size) == (4, 1)
    assert result.precompute.computed == 5 and result.prefetch.files == 0
    with pytest.raises(ValueError, match="at least 2"):
        run_aesthetic_demo(str(repo.labels_path), str(repo.root / "data"), keywords="no-such-word", progress=False,
                           cache_dir=str(tmp_path / "cache"))


def _linear_data(n, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    y = x[:, :1] * 0.5 - x[:, 1:2] + 7.0
    return TensorDataset(x, y)


def test_train_regressor_learns_and_is_deterministic():
    train, valid = _linear_data(256, 0), _linear_data(64, 1)
    result = train_regressor(train, valid, epochs=15, lr=1e-2, batch_size=32, device="cpu")
    losses = [s.valid_loss for s in result.history]
    assert losses[-1] < losses[0] / 10
    assert isinstance(result.model, AestheticMLP)
    again = train_regressor(train, valid, epochs=15, lr=1e-2, batch_size=32, device="cpu")
    assert [s.valid_loss for s in again.history] == losses
    no_valid = train_regressor(train, None, epochs=1, device="cpu")
    assert math.isnan(no_valid.history[0].valid_loss)
    with pytest.raises(ValueError):
        train_regressor(TensorDataset(torch.zeros(0, 8), torch.zeros(0, 1)), epochs=1)
