"""RemoteRepo.prefetch spread over worker processes, against a real ``streamloader serve`` subprocess."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict

import pytest

from streamloader.cache import FileCache
from streamloader.errors import RemoteFileNotFoundError
from streamloader.remote.client import DagsHubClient
from streamloader.remote.repo import RemoteRepo
from streamloader.server import ServerFaults

N_FILES = 60


def make_files(root: Path) -> Dict[str, bytes]:
    """N_FILES small files of distinct content under root/data."""
    files = {}
    (root / "data").mkdir(parents=True)
    for i in range(N_FILES):
        data = os.urandom(1000 + 37 * i)
        (root / "data" / f"f{i:03d}.bin").write_bytes(data)
        files[f"data/f{i:03d}.bin"] = data
    return files


def open_repo(srv: Any, tmp_path: Path) -> RemoteRepo:
    return RemoteRepo(DagsHubClient(srv.repo_url, branch="main", token=False), cache=FileCache(str(tmp_path / "cache")))


@pytest.fixture
def served(tmp_path: Path, make_server_process: Callable[..., Any]) -> Any:
    files = make_files(tmp_path / "repo")
    srv = make_server_process(tmp_path / "repo")
    return srv, files


def test_every_file_fetched_exactly_once_and_byte_identical(served: Any, tmp_path: Path) -> None:
    srv, files = served
    repo = open_repo(srv, tmp_path)
    repo.listing("data")
    srv.reset_counts()
    result = repo.prefetch(sorted(files), max_concurrency=6, progress=False, processes=3)
    assert (result.files, result.bytes, result.failed) == (len(files), sum(map(len, files.values())), {})
    counts = srv.get_counts("raw")
    assert sorted(counts) == sorted(f"data/{Path(p).name}" for p in files) or len(counts) == len(files)
    assert set(counts.values()) == {1}
    for path, data in files.items():
        local = repo.cached_path(path)
        assert local is not None and Path(local).read_bytes() == data
    srv.reset_counts()
    again = repo.prefetch(sorted(files), progress=False, processes=2)  # warm: no request at all
    assert again.files == len(files) and srv.get_counts("raw") == {}
    assert (again.cached, again.downloaded, again.downloaded_bytes) == (len(files), 0, 0)
    assert str(again).startswith(f"0 downloaded (0 B), {len(files)} already cached, 0 failed in ")
    assert result.cached == 0 and str(result).startswith(f"{len(files)} downloaded (")


def test_with_progress_bar(served: Any, tmp_path: Path) -> None:
    srv, files = served
    result = open_repo(srv, tmp_path).prefetch(sorted(files), progress=True, processes=2)
    assert (result.files, result.failed) == (len(files), {})


@pytest.mark.parametrize("on_error", ["skip", "raise"])
def test_failures_follow_on_error(served: Any, tmp_path: Path, on_error: str) -> None:
    srv, files = served
    repo = open_repo(srv, tmp_path)
    wanted = sorted(files) + ["data/missing-1.bin", "data/missing-2.bin"]
    if on_error == "raise":
        with pytest.raises(FileNotFoundError):
            repo.prefetch(wanted, progress=False, on_error="raise", processes=2)
        assert all(repo.cached_path(p) is not None for p in files)  # the others still finished
        return
    result = repo.prefetch(wanted, progress=False, on_error="skip", processes=2)
    assert result.files == len(files)
    assert sorted(result.failed) == ["data/missing-1.bin", "data/missing-2.bin"]
    assert all(isinstance(e, RemoteFileNotFoundError) for e in result.failed.values())


def test_killed_worker_process_fails_its_files_without_hanging(tmp_path: Path,
                                                              make_server_process: Callable[..., Any]) -> None:
    files = make_files(tmp_path / "repo")
    srv = make_server_process(tmp_path / "repo", faults=ServerFaults(latency=0.2))
    repo = open_repo(srv, tmp_path)
    repo.listing("data")
    own_pid = os.getpid()
    before = set(_children(own_pid))  # servers and whatever else this test process runs
    killed = []

    def kill_a_worker() -> None:
        deadline = time.monotonic() + 20
        while not killed and time.monotonic() < deadline:
            for pid in set(_children(own_pid)) - before:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_worker)
    killer.start()
    result = repo.prefetch(sorted(files), max_concurrency=2, progress=False, on_error="skip", processes=2)
    killer.join()
    assert killed, "no worker process was seen"
    assert result.failed, "the killed worker's files must be reported as failed"
    assert result.files + len(result.failed) == len(files)
    assert all("exited" in str(e) for e in result.failed.values())
    assert set(_children(own_pid)) <= before  # no worker left behind


def test_workers_leave_ctrl_c_to_the_parent(tmp_path: Path, make_server_process: Callable[..., Any]) -> None:
    """Ctrl-C reaches the whole process group; a worker must not die of it (nor print anything): the parent
    decides (KeyboardInterrupt there cancels the job, which stops the workers)."""
    files = make_files(tmp_path / "repo")
    srv = make_server_process(tmp_path / "repo", faults=ServerFaults(latency=0.1))
    repo = open_repo(srv, tmp_path)
    repo.listing("data")
    own_pid = os.getpid()
    before = set(_children(own_pid))
    interrupted: list = []

    def interrupt_the_workers() -> None:
        deadline = time.monotonic() + 20
        while len(interrupted) < 2 and time.monotonic() < deadline:
            for pid in set(_children(own_pid)) - before - set(interrupted):
                time.sleep(0.2)  # past the worker's start-up: into its downloads
                os.kill(pid, signal.SIGINT)
                interrupted.append(pid)
            time.sleep(0.02)

    sender = threading.Thread(target=interrupt_the_workers)
    sender.start()
    result = repo.prefetch(sorted(files), max_concurrency=4, progress=False, on_error="skip", processes=2)
    sender.join()
    assert interrupted, "no worker process was seen"
    assert (result.files, result.failed) == (len(files), {})


def _children(pid: int) -> list:
    """Pids of the live prefetch worker processes of ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


def _count_in_daemon(out):
    from streamloader.remote.prefetch import process_count

    out.put((process_count(None, 1000, 32), process_count(4, 1000, 32)))


def test_daemonic_processes_fall_back_to_threads():
    """A DataLoader worker is daemonic and may not start children: prefetch there must stay in-process."""
    import multiprocessing as mp

    from streamloader.remote.prefetch import process_count

    assert process_count(4, 1000, 32) == 4 and process_count(None, 10, 32) == 1
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    proc = ctx.Process(target=_count_in_daemon, args=(out,), daemon=True)
    proc.start()
    assert out.get(timeout=30) == (1, 1)
    proc.join(30)
