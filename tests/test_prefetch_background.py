"""prefetch(..., wait=False): a PrefetchJob downloads in the background while the training loop already reads."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from _helpers import child_pids
from conftest import TOKEN, make_random_files, remote_repo
from streamloader.errors import RemoteFileNotFoundError
from streamloader.remote.prefetch import PrefetchJob
from streamloader.server import ServerFaults
from streamloader.synthetic import make_laion_repo

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork with threads (Python 3.12+)


@pytest.fixture
def slow(tmp_path: Path, make_server_process: Callable[..., Any]) -> Any:
    files = make_random_files(tmp_path / "repo")
    srv = make_server_process(tmp_path / "repo", faults=ServerFaults(latency=0.05))
    return srv, files


@pytest.mark.parametrize("processes", [1, 2])
def test_reader_and_background_job_fetch_every_file_once(slow: Any, tmp_path: Path, processes: int) -> None:
    srv, files = slow
    repo = remote_repo(srv, tmp_path / "cache", token=False)
    repo.listing("data")
    srv.reset_counts()
    started = time.monotonic()
    job = repo.prefetch(sorted(files), max_concurrency=4, progress=False, processes=processes, wait=False)
    assert isinstance(job, PrefetchJob)
    assert time.monotonic() - started < 1.0 and not job.done()  # 60 files at 4 x 50 ms: it has barely begun
    for path in sorted(files):  # the training loop starts at once, in the same order
        assert repo.read_bytes(path) == files[path]
    result = job.result(timeout=60)
    assert job.done() and (result.files, result.failed) == (len(files), {})
    counts = srv.get_counts("raw")
    assert len(counts) == len(files) and set(counts.values()) == {1}  # nobody downloaded a file twice


@pytest.mark.parametrize("processes", [1, 2])
def test_cancel_stops_the_job_and_leaves_only_whole_files(slow: Any, tmp_path: Path, processes: int) -> None:
    srv, files = slow
    srv.set_faults(latency=0.3)
    repo = remote_repo(srv, tmp_path / "cache", token=False)
    repo.listing("data")
    before = set(child_pids(os.getpid()))
    job = repo.prefetch(sorted(files), max_concurrency=2, progress=False, processes=processes, wait=False)
    deadline = time.monotonic() + 20  # workers may take a while to start on a loaded machine: wait for a first file
    while not any(repo.cached_path(p) for p in files) and time.monotonic() < deadline:
        time.sleep(0.05)
    job.cancel()
    result = job.result(timeout=30)  # returns soon, with what was fetched until then
    assert job.cancelled and 0 < result.files < len(files)
    cached = [p for p in files if repo.cached_path(p) is not None]
    assert len(cached) >= result.files and len(cached) < len(files)
    assert all(Path(repo.cached_path(p)).read_bytes() == files[p] for p in cached)
    deadline = time.monotonic() + 10
    while set(child_pids(os.getpid())) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not set(child_pids(os.getpid())) - before  # worker processes are gone
    assert repo.prefetch(sorted(files), progress=False).files == len(files)  # a later run completes


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_failures_surface_in_result(slow: Any, tmp_path: Path, on_error: str) -> None:
    srv, files = slow
    repo = remote_repo(srv, tmp_path / "cache", token=False)
    job = repo.prefetch(sorted(files) + ["data/missing.bin"], progress=False, processes=2, on_error=on_error,
                        wait=False)
    if on_error == "raise":
        with pytest.raises(FileNotFoundError):
            job.result(timeout=60)
    else:
        result = job.result(timeout=60)
        assert result.files == len(files) and isinstance(result.failed["data/missing.bin"], RemoteFileNotFoundError)
    assert all(repo.cached_path(p) is not None for p in files)


def test_result_timeout_is_a_timeout_error(slow: Any, tmp_path: Path) -> None:
    srv, files = slow
    job = remote_repo(srv, tmp_path / "cache", token=False).prefetch(sorted(files), max_concurrency=1, progress=False, wait=False)
    with pytest.raises(TimeoutError):
        job.result(timeout=0.05)
    job.cancel()
    job.result(timeout=30)


def test_dataset_epoch_starts_while_the_job_downloads(tmp_path: Path, make_server: Callable[..., Any]) -> None:
    from streamloader.data.laion import LaionAestheticsDataset

    repo_dir = tmp_path / "repo"
    make_laion_repo(repo_dir, n_images=40, n_squirrel=2, image_size=(32, 32))
    srv = make_server(str(repo_dir), token=TOKEN, faults=ServerFaults(latency=0.03))
    base = "dagshub://user/repo/data"
    options = {"host": srv.url, "token": TOKEN, "branch": "main"}
    dataset = LaionAestheticsDataset(f"{base}/labels.tsv", base, storage_options=options)
    local = LaionAestheticsDataset(str(repo_dir / "data" / "labels.tsv"), str(repo_dir / "data"))
    srv.reset_counts()
    job = dataset.prefetch(progress=False, processes=1, max_concurrency=4, wait=False)
    for i in range(len(dataset)):
        image, score = dataset[i]
        expected_image, expected_score = local[i]
        assert image.equal(expected_image) and score.equal(expected_score)
    assert job.result(timeout=60).files == len(dataset)
    raw = [p for p, n in srv.get_counts("raw").items() if p.endswith(".jpg") for _ in range(n)]
    assert len(raw) == len(set(raw)) == len(dataset)


def test_hooked_prefetch_in_background(tmp_path: Path, make_server: Callable[..., Any], monkeypatch: Any) -> None:
    import streamloader as sp
    from streamloader.hooks import install_hooks

    repo_dir = tmp_path / "repo"
    make_laion_repo(repo_dir, n_images=12, n_squirrel=2, image_size=(32, 32))
    srv = make_server(str(repo_dir), token=TOKEN)
    monkeypatch.setenv("DAGSHUB_TOKEN", TOKEN)
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    with install_hooks(project_root=str(project), repo_url=srv.repo_url, branch="main"):
        names = sorted(os.path.join("data", n) for n in os.listdir(repo_dir / "data") if n.endswith(".jpg"))
        outside = str(tmp_path / "elsewhere" / "x.bin")  # under no hooked root: a counted failure
        job = sp.prefetch(names + [outside], progress=False, on_error="skip", wait=False)
        result = job.result(timeout=60)
        assert result.files == 12 and list(result.failed) == [outside]
        srv.reset_counts()
        for name in names:
            with open(name, "rb") as f:
                assert f.read() == (repo_dir / name).read_bytes()
        assert srv.request_count(kind="raw") == 0
