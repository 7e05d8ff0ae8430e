"""RemoteRepo.prefetch spread over worker processes, against a real ``streamloader serve`` subprocess."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable, List, Set, Tuple

import pytest

from _helpers import child_pids
from conftest import make_random_files, remote_repo
from streamloader.errors import RemoteFileNotFoundError
from streamloader.server import ServerFaults

@pytest.fixture
def served(tmp_path: Path, make_server_process: Callable[..., Any]) -> Any:
    files = make_random_files(tmp_path / "repo")
    srv = make_server_process(tmp_path / "repo")
    return srv, files


def test_every_file_fetched_exactly_once_and_byte_identical(served: Any, tmp_path: Path) -> None:
    srv, files = served
    repo = remote_repo(srv, tmp_path / "cache", token=False)
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
    result = remote_repo(srv, tmp_path / "cache", token=False).prefetch(sorted(files), progress=True, processes=2)
    assert (result.files, result.failed) == (len(files), {})


@pytest.mark.parametrize("on_error", ["skip", "raise"])
def test_failures_follow_on_error(served: Any, tmp_path: Path, on_error: str) -> None:
    srv, files = served
    repo = remote_repo(srv, tmp_path / "cache", token=False)
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


def _signal_new_workers(sig: int, count: int, settle: float = 0.0) -> Tuple[threading.Thread, List[int], Set[int]]:
    """Start a thread that sends ``sig`` to the first ``count`` child processes of this one started from now on
    (each ``settle`` s after it is seen; within 20 s). Returns (the thread, the pids signalled so far, the
    children there were before: servers and whatever else this test process runs)."""
    own_pid = os.getpid()
    before = set(child_pids(own_pid))
    signalled: List[int] = []

    def watch() -> None:
        deadline = time.monotonic() + 20
        while len(signalled) < count and time.monotonic() < deadline:
            for pid in sorted(set(child_pids(own_pid)) - before - set(signalled))[:count - len(signalled)]:
                time.sleep(settle)
                os.kill(pid, sig)
                signalled.append(pid)
            time.sleep(0.02)

    thread = threading.Thread(target=watch)
    thread.start()
    return thread, signalled, before


def test_killed_worker_process_fails_its_files_without_hanging(tmp_path: Path,
                                                              make_server_process: Callable[..., Any]) -> None:
    files = make_random_files(tmp_path / "repo")
    srv = make_server_process(tmp_path / "repo", faults=ServerFaults(latency=0.2))
    repo = remote_repo(srv, tmp_path / "cache", token=False)
    repo.listing("data")
    # (killed once it is under way: with 0.2 s per request it has claimed a chunk and fetched a file or two)
    killer, killed, before = _signal_new_workers(signal.SIGKILL, 1, settle=0.3)
    result = repo.prefetch(sorted(files), max_concurrency=2, progress=False, on_error="skip", processes=2)
    killer.join()
    assert killed, "no worker process was seen"
    assert result.failed, "the killed worker's files must be reported as failed"
    assert result.files + len(result.failed) == len(files)
    assert all("exited" in str(e) for e in result.failed.values())
    # only what it had claimed and not reported, at most two chunks of 7: the other worker took every chunk left
    # (a fixed half each failed ~29 of these 60)
    assert len(result.failed) <= 14
    assert all(repo.cached_path(path) is not None for path in files if path not in result.failed)
    assert set(child_pids(os.getpid())) <= before  # no worker left behind


@pytest.mark.parametrize("engine", ["event loop", "threads"])
def test_workers_share_the_list_in_chunks_and_the_first_free_takes_the_next(
        served: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: str) -> None:
    from streamloader.remote import aioprefetch, prefetch

    if engine == "threads":
        monkeypatch.setenv(aioprefetch.ENGINE_ENV, "threads")
    srv, files = served
    repo = remote_repo(srv, tmp_path / "cache", token=False)
    lines: List[Any] = []
    made = prefetch.WorkLine

    def keep(*args: Any, **kwargs: Any) -> Any:
        lines.append(made(*args, **kwargs))
        return lines[-1]

    monkeypatch.setattr(prefetch, "WorkLine", keep)
    srv.reset_counts()
    result = repo.prefetch(sorted(files), max_concurrency=4, progress=False, processes=2)
    assert (result.files, result.downloaded, result.failed) == (len(files), len(files), {})
    assert set(srv.get_counts("raw").values()) == {1}  # one GET per file, whichever worker took it
    line = lines[0]
    held = [line.held_by(0), line.held_by(1)]
    assert sorted(held[0] + held[1]) == sorted(files)  # every chunk claimed by exactly one worker
    assert held[0] and held[1]
    assert not os.path.exists(line.path)  # the shared file is gone once the workers have ended


def test_workers_leave_ctrl_c_to_the_parent(tmp_path: Path, make_server_process: Callable[..., Any]) -> None:
    """Ctrl-C reaches the whole process group; a worker must not die of it (nor print anything): the parent
    decides (KeyboardInterrupt there cancels the job, which stops the workers)."""
    files = make_random_files(tmp_path / "repo")
    srv = make_server_process(tmp_path / "repo", faults=ServerFaults(latency=0.1))
    repo = remote_repo(srv, tmp_path / "cache", token=False)
    repo.listing("data")
    sender, interrupted, _before = _signal_new_workers(signal.SIGINT, 2, settle=0.2)
    result = repo.prefetch(sorted(files), max_concurrency=4, progress=False, on_error="skip", processes=2)
    sender.join()
    assert interrupted, "no worker process was seen"
    assert (result.files, result.failed) == (len(files), {})


_WORKER_TABLES = textwrap.dedent("""
    import json, os, sys, threading, time
    from streamloader.cache import FileCache
    from streamloader.remote.client import DagsHubClient
    from streamloader.remote.repo import RemoteRepo

    def table(pid):
        try:
            with open(f"/proc/{pid}/status") as f:
                return int(next(line for line in f if line.startswith("FDSize:")).split()[1])
        except (OSError, StopIteration):
            return 0  # (ended meanwhile)

    def children():
        return {int(t) for t in open(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read().split()}

    repo = RemoteRepo(DagsHubClient(sys.argv[1], token=False, branch="main"), FileCache(sys.argv[2]))
    paths = [f"data/{name}" for name in repo.listing("data").names()]
    before, sizes, done = children(), {}, threading.Event()

    def watch():
        while not done.is_set():
            for pid in children() - before:
                sizes[pid] = max(sizes.get(pid, 0), table(pid))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    result = repo.prefetch(paths, max_concurrency=128, progress=False, processes=2)
    done.set()
    watcher.join()
    print(json.dumps({"files": result.files, "failed": len(result.failed), "workers": sorted(sizes.values())}))
""")


def test_a_worker_grows_its_descriptor_table_once_before_it_starts_threads(
        tmp_path: Path, make_server_process: Callable[..., Any]) -> None:
    """Linux grows a descriptor table as descriptors open, and in a process with threads each growth stalls it
    10-20 ms (an RCU grace period); a forked worker starts from a table sized for the few its parent had open. So
    each worker makes room for two descriptors per request it may have in flight first: the kernel's table size
    (FDSize) of a worker holds that many, however few requests the host's limiter lets it have in flight. (In a
    fresh process: one that had a high descriptor open would hand its workers a large table anyway.)"""
    files = make_random_files(tmp_path / "repo", count=200)  # 128 requests may be in flight (64 per worker)
    srv = make_server_process(tmp_path / "repo", faults=ServerFaults(latency=0.01))
    env = {**os.environ, "STREAMLOADER_HOST_LIMITS": "initial=2,ceiling=4"}  # a few sockets and slots at a time
    out = subprocess.run([sys.executable, "-c", _WORKER_TABLES, srv.repo_url, str(tmp_path / "cache")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert (got["files"], got["failed"]) == (len(files), 0)
    assert len(got["workers"]) == 2, got
    assert all(size >= 2 * 64 + 32 for size in got["workers"]), got  # 64 requests each, at most 4 in flight


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


def _hold_commit_lock_until_stopped(cache_dir: str, ready: Any) -> None:
    from types import SimpleNamespace

    from streamloader.cache import FileCache
    from streamloader.cache.commit_queue import QUEUE
    from streamloader.remote.prefetch import _stop_handler

    signal.signal(signal.SIGTERM, _stop_handler(SimpleNamespace(cache=FileCache(cache_dir))))
    QUEUE._cond.acquire()  # as if the parent's terminate() landed while the main thread was inside submit()
    ready.set()
    time.sleep(60)
    os._exit(3)


def test_a_stopped_worker_exits_even_when_stopped_holding_the_commit_lock(tmp_path: Path) -> None:
    """The parent (and multiprocessing's exit handler) joins a terminated worker without a timeout: its SIGTERM
    handler must never wait forever on a lock the interrupted main thread holds."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_hold_commit_lock_until_stopped, args=(str(tmp_path / "cache"), ready), daemon=True)
    proc.start()
    try:
        assert ready.wait(30)
        started = time.monotonic()
        proc.terminate()
        proc.join(15)
        assert proc.exitcode == 0, proc.exitcode
        assert time.monotonic() - started < 8
    finally:
        if proc.is_alive():
            proc.kill()


_EXIT_WITH_STOPPED_WORKERS = r"""
import os, signal, sys, time
sys.path.insert(0, sys.argv[3])
from _helpers import child_pids
from conftest import remote_repo

repo = remote_repo(type("S", (), {"repo_url": sys.argv[1]})(), sys.argv[2], token=False)
job = repo.prefetch([f"data/{n}" for n in sys.argv[4:]],
                    progress=False, processes=2, wait=False)
deadline = time.monotonic() + 20
workers = []
def forked(pid):  # a worker forked from this process (not a helper it spawned, like a resource tracker)
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return sys.argv[0].encode() in f.read()
    except OSError:
        return False

while len(workers) < 2 and time.monotonic() < deadline:
    workers = [p for p in child_pids(os.getpid()) if forked(p)]
    time.sleep(0.01)
for pid in workers:
    os.kill(pid, signal.SIGSTOP)  # stuck where no signal handler can run: SIGTERM stays pending
print(" ".join(map(str, workers)), flush=True)
sys.exit(0)  # the job is never waited for: the interpreter's exit must not wait for those workers forever
"""


def test_interpreter_exit_never_waits_forever_for_stuck_workers(tmp_path: Path,
                                                              make_server_process: Callable[..., Any]) -> None:
    import subprocess
    import sys

    files = make_random_files(tmp_path / "repo")
    srv = make_server_process(tmp_path / "repo", faults=ServerFaults(latency=0.5))
    script = tmp_path / "exit_with_stopped_workers.py"
    script.write_text(_EXIT_WITH_STOPPED_WORKERS)
    started = time.monotonic()
    run = subprocess.run([sys.executable, str(script), srv.repo_url, str(tmp_path / "cache"),
                          str(Path(__file__).parent)] + sorted(Path(p).name for p in files),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    workers = [int(pid) for pid in run.stdout.split()]
    assert len(workers) == 2
    assert time.monotonic() - started < 30
    for pid in workers:  # killed, not left behind stopped
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]


_PROGRESS_AFTER_A_POISONED_TQDM_LOCK = r"""
import os, signal, sys
import multiprocessing as mp
from tqdm import tqdm
sys.path.insert(0, sys.argv[3])
from conftest import remote_repo

def die_holding_it():
    tqdm.get_lock().acquire()  # what a forked child (a DataLoader worker...) drawing its own bar may hold
    os.kill(os.getpid(), signal.SIGKILL)

tqdm.get_lock()  # tqdm's process-wide lock exists before the fork, as after any earlier bar
child = mp.get_context("fork").Process(target=die_holding_it)
child.start()
child.join()
assert child.exitcode == -signal.SIGKILL
assert not tqdm.get_lock().locks[0].acquire(timeout=0.5)  # tqdm's own lock is now taken for good
repo = remote_repo(type("S", (), {"repo_url": sys.argv[1]})(), sys.argv[2], token=False)
paths = [f"data/{name}" for name in sys.argv[4:]]
job = repo.prefetch(paths, progress=True, processes=2, wait=False)
result = job.result(timeout=60)
assert (result.files, result.failed) == (len(paths), {}), result
from streamloader.cli import main
assert main(["prefetch", "dagshub://user/repo/data", "--host", sys.argv[1].rsplit("/user/repo", 1)[0],
             "--cache-dir", sys.argv[2]]) == 0  # a progress bar and log lines through tqdm.write
print("done", result.files, flush=True)
"""


def test_progress_bars_never_wait_on_a_lock_a_dead_child_took(tmp_path: Path,
                                                            make_server_process: Callable[..., Any]) -> None:
    """tqdm's own lock is a semaphore shared with every forked child: one that died holding it would make the
    next bar update wait forever. The library's bars and log lines use a lock of their own process."""
    import subprocess
    import sys

    files = make_random_files(tmp_path / "repo")
    srv = make_server_process(tmp_path / "repo")
    script = tmp_path / "progress_after_a_poisoned_lock.py"
    script.write_text(_PROGRESS_AFTER_A_POISONED_TQDM_LOCK)
    args = [srv.repo_url, str(tmp_path / "cache"), str(Path(__file__).parent)] + sorted(Path(p).name for p in files)
    run = subprocess.run([sys.executable, str(script)] + args, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-2:] == ["done", str(len(files))]  # after the CLI's summary line
    assert "prefetch" in run.stderr  # the bars were drawn


def test_workers_inherit_the_engine_modules_from_the_parent(served: Any, tmp_path: Path) -> None:
    """The parent imports the event-loop engine (asyncio, the lean HTTP client) before it forks, once, so that no
    worker spends its start importing it (~10 ms each); the workers still fetch every file."""
    import subprocess
    import sys

    srv, files = served
    script = (
        "import sys\n"
        "from streamloader.cache import FileCache\n"
        "from streamloader.remote.client import DagsHubClient\n"
        "from streamloader.remote.repo import RemoteRepo\n"
        f"client = DagsHubClient({srv.repo_url!r}, token=False, branch='main')\n"
        f"repo = RemoteRepo(client, FileCache({str(tmp_path / 'c')!r}))\n"
        "engine = 'streamloader.remote.aioprefetch'\n"
        "before = engine in sys.modules\n"
        f"result = repo.prefetch({sorted(files)!r}, progress=False, processes=2)\n"
        "print(before, engine in sys.modules, result.downloaded)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", str(len(files))]
