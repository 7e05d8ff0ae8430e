"""Issues 14 and 15 — a host that pushes back, drips or dies: the per-host limiter (streamloader/remote/limits.py)
makes a job slow down and complete, or end fast with one clear, typed error.

Real local servers (in-process, or a `streamloader serve` subprocess that is SIGKILLed), real prefetch worker
processes, the real CLI. The limiter's state lives under the test's own STREAMLOADER_CACHE (tests/conftest.py).
"""
from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Dict, Tuple

import pytest

from conftest import TOKEN
from reliability.conftest import FAST, wait_for_log
from streamloader.cache import FileCache
from streamloader.errors import HostUnreachableError, RemoteError
from streamloader.remote.client import DagsHubClient, RetryPolicy
from streamloader.remote.repo import RemoteRepo
from streamloader.server import ServerFaults


def _tree(root, n: int) -> Dict[str, bytes]:
    files = {}
    for i in range(n):
        data = os.urandom(1000 + (i * 37) % 2000)
        path = root / "data" / f"f{i:04d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files[f"data/f{i:04d}.bin"] = data
    return files


@pytest.fixture
def files_300(tmp_path) -> Tuple[object, Dict[str, bytes]]:
    return tmp_path / "repo", _tree(tmp_path / "repo", 300)


@pytest.fixture
def files_600(tmp_path) -> Tuple[object, Dict[str, bytes]]:
    return tmp_path / "repo", _tree(tmp_path / "repo", 600)


@pytest.mark.timeout(120)
def test_a_rate_limited_prefetch_in_two_processes_completes_and_backs_off(files_300, make_server, figures):
    """The server admits 8 raw requests at a time and answers 429 beyond; the job starts 32 (2 processes x 16
    threads). Without the limiter each 429 costs one of 8 attempts and files fail; with it the machine-wide
    concurrency drops to what the server takes, and every file arrives intact."""
    root, files = files_300
    srv = make_server(root, token=TOKEN, faults=ServerFaults(latency=0.1, concurrency_limit=8, retry_after=0.05))
    repo = RemoteRepo(DagsHubClient(srv.repo_url, token=TOKEN, retry=FAST), FileCache())
    started = time.monotonic()
    result = repo.prefetch(sorted(files), max_concurrency=32, processes=2, progress=False, on_error="skip")
    elapsed = time.monotonic() - started
    assert result.failed == {} and result.files == len(files)
    for path, data in files.items():
        with open(repo.cached_path(path), "rb") as f:
            assert f.read() == data, path
    raw = sorted((e for e in srv.request_log if e["kind"] == "raw"), key=lambda e: e["started"])
    throttled = sum(e["fault"] == "throttle" for e in raw)
    early = max(e["in_flight"] for e in raw[:64])
    late = statistics.median(e["in_flight"] for e in raw[len(raw) // 2:])
    assert throttled > 0 and early > 12, (throttled, early)  # it did push back, against a real burst
    assert late <= 8, late  # ...and the two processes together came down to what it admits (32 without backoff)
    figures.update(files=len(files), requests=len(raw), throttled=throttled, in_flight_first=early,
                   in_flight_median_2nd_half=late, seconds=round(elapsed, 1), processes=3)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_retry_after_is_honoured_in_both_forms(form, files_300, make_server, figures):
    root, _files = files_300
    srv = make_server(root, token=TOKEN)
    client = DagsHubClient(srv.repo_url, token=TOKEN, retry=RetryPolicy(initial_backoff=0.01, max_backoff=0.05))
    client.resolve_revision()
    # 1 s as seconds; as a date (whole seconds, rounded down) 2 s ahead is 1 to 2 s ahead
    srv.faults.update({"throttle_rate": 1.0, "retry_after": 1.0 if form == "seconds" else 2.0,
                       "retry_after_date": form == "http-date"})

    def lift() -> None:  # the first 429 is the only one
        wait_for_log(srv, lambda log: any(e["fault"] == "throttle" for e in log))
        srv.faults.throttle_rate = 0.0

    lifter = threading.Thread(target=lift)
    lifter.start()
    assert client.read_bytes("data/f0001.bin") == (root / "data" / "f0001.bin").read_bytes()
    lifter.join()
    raw = [e for e in srv.request_log if e["kind"] == "raw"]
    assert [e["status"] for e in raw] == [429, 200]
    gap = raw[1]["started"] - raw[0]["started"]
    assert 0.95 <= gap < 3.0, gap  # our own backoff would have retried after 10-50 ms
    figures.update(form=form, gap_s=round(gap, 2))


@pytest.mark.timeout(60)
def test_a_slow_drip_ends_within_a_bound_with_a_typed_error(files_300, make_server, figures):
    """One byte every 0.5 s keeps every recv under a 2 s read timeout: only the per-request deadline stops it."""
    root, _files = files_300
    srv = make_server(root, token=TOKEN)
    client = DagsHubClient(srv.repo_url, token=TOKEN, retry=RetryPolicy(connect_timeout=2, read_timeout=2))
    client.resolve_revision()
    srv.faults.update({"drip_rate": 1.0, "drip_interval": 0.5})
    started = time.monotonic()
    with pytest.raises(RemoteError, match="too slow") as info:
        client.read_bytes("data/f0002.bin")  # ~1.1 KB: 9 minutes at this pace
    elapsed = time.monotonic() - started
    assert elapsed < 15, elapsed
    assert srv.request_count("data/f0002.bin", kind="raw") <= RetryPolicy().attempts
    figures.update(error=type(info.value).__name__, seconds=round(elapsed, 1),
                   attempts=srv.request_count("data/f0002.bin", kind="raw"))


def _wait_for_raw(srv, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while srv.request_count(kind="raw") < n:
        assert time.monotonic() < deadline, "the prefetch made no progress"
        time.sleep(0.05)


@pytest.mark.timeout(120)
def test_a_server_killed_mid_prefetch_fails_it_fast_with_one_message(files_600, make_server_process, caplog,
                                                                     figures):
    root, files = files_600
    srv = make_server_process(root, token=TOKEN, faults=ServerFaults(latency=0.02))
    repo = RemoteRepo(DagsHubClient(srv.repo_url, token=TOKEN), FileCache())  # the default retry policy
    job = repo.prefetch(sorted(files), max_concurrency=32, processes=2, progress=False, on_error="skip",
                        wait=False)
    _wait_for_raw(srv, 100)
    os.kill(srv.pid, signal.SIGKILL)
    killed = time.monotonic()
    result = job.result(timeout=60)
    elapsed = time.monotonic() - killed
    assert elapsed < 10, elapsed  # without the breaker: 8 attempts per file, ~1 file/s for minutes
    assert 0 < result.files < len(files) and result.files + len(result.failed) == len(files)
    errors = set(map(str, result.failed.values()))
    first = next(iter(result.failed.values()))
    assert isinstance(first, HostUnreachableError) and first.host == srv.url and srv.url in str(first)
    unreachable = sum(isinstance(e, HostUnreachableError) for e in result.failed.values())
    assert unreachable >= len(result.failed) - 32, errors  # a request in flight at the kill may fail otherwise
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) <= 1 + len(result.failed) - unreachable and warnings[0].startswith("prefetch stopped")
    figures.update(fetched=result.files, failed=len(result.failed), seconds_after_kill=round(elapsed, 1),
                   warnings=len(warnings), processes=4)


@pytest.mark.timeout(120)
def test_the_cli_prefetch_of_a_dying_server_ends_fast_with_one_error_line(files_600, make_server_process,
                                                                          isolated_env, figures):
    root, files = files_600
    srv = make_server_process(root, token=TOKEN, faults=ServerFaults(latency=0.02))
    env = {**os.environ, "DAGSHUB_TOKEN": TOKEN, "PYTHONPATH": os.pathsep.join(sys.path)}
    cli = subprocess.Popen([sys.executable, "-m", "streamloader", "prefetch", "dagshub://user/repo/data",
                            "--host", srv.url, "-j", "32"], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_raw(srv, 100)
        os.kill(srv.pid, signal.SIGKILL)
        killed = time.monotonic()
        out, err = cli.communicate(timeout=60)
        elapsed = time.monotonic() - killed
    finally:
        if cli.poll() is None:
            cli.kill()
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "prefetch:" not in line[:9]]
    assert cli.returncode == 1 and elapsed < 10, (cli.returncode, elapsed)
    assert len(lines) == 1 and "unreachable" in lines[0] and srv.url in lines[0], err[-2000:]
    figures.update(seconds_after_kill=round(elapsed, 1), stderr_lines=len(lines))


def _raw_log(srv) -> list:
    return sorted((e for e in srv.request_log if e["kind"] == "raw"), key=lambda e: e["started"])


@pytest.mark.timeout(180)
def test_far_from_the_server_a_prefetch_raises_its_concurrency_past_64_and_beats_a_fixed_32(tmp_path,
                                                                                           make_server_process,
                                                                                           figures):
    """A far server (250 ms per request) that takes 128 in flight (429 above). A fixed 32 is capped at
    128 files/s; left to the limiter (no max_concurrency), the prefetch climbs past 64 in flight as long as answers
    come as fast, and finishes much sooner. (At 100 ms the fixed 32 already needs ~320 files/s, about what the
    client and the server together manage on a loaded 2-core machine: the bench measures that case.) The server
    runs in its own process and counts what is in flight."""
    root = tmp_path / "repo"
    files = _tree(root, 800)
    srv = make_server_process(root, token=TOKEN, faults=ServerFaults(latency=0.25, concurrency_limit=128))
    timings = {}
    for name, limit in (("fixed 32", 32), ("adaptive", None)):
        repo = RemoteRepo(DagsHubClient(srv.repo_url, token=TOKEN, retry=FAST), FileCache(str(tmp_path / name)))
        repo.revision()
        srv.reset_counts()
        started = time.monotonic()
        result = repo.prefetch(sorted(files), max_concurrency=limit, progress=False, on_error="skip")
        timings[name] = time.monotonic() - started
        assert result.failed == {} and result.downloaded == len(files), (name, result)
        raw = _raw_log(srv)
        timings[name + " peak"] = max(e["in_flight"] for e in raw)
        timings[name + " throttled"] = sum(e["fault"] == "throttle" for e in raw)
    for path in list(files)[:50]:
        with open(repo.cached_path(path), "rb") as f:
            assert f.read() == files[path], path
    assert timings["fixed 32 peak"] <= 32 and timings["adaptive peak"] > 64, timings
    ratio = timings["fixed 32"] / timings["adaptive"]
    # ~2-3x on an idle machine; the CPU of a loaded one caps the adaptive side (1.29x seen with 3 test runs at
    # once): the test asserts it is sooner at all, the bench (P13) measures by how much
    assert ratio >= 1.1, timings
    figures.update(files=len(files), ratio=round(ratio, 2), **{k.replace(" ", "_"): round(v, 2)
                                                                 for k, v in timings.items()})


@pytest.mark.timeout(180)
def test_left_to_the_limiter_a_prefetch_backs_off_to_what_the_server_takes(tmp_path, make_server_process, figures):
    """The same job against a server that takes 16 in flight (429 above, no Retry-After): the limiter starts at
    32 and would grow; the pushbacks bring the machine's requests in flight down to about what the server takes,
    and every file arrives intact."""
    root = tmp_path / "repo"
    files = _tree(root, 400)
    srv = make_server_process(root, token=TOKEN, faults=ServerFaults(latency=0.1, concurrency_limit=16))
    repo = RemoteRepo(DagsHubClient(srv.repo_url, token=TOKEN, retry=FAST), FileCache())
    result = repo.prefetch(sorted(files), progress=False, on_error="skip")
    assert result.failed == {} and result.downloaded == len(files), result
    for path, data in files.items():
        with open(repo.cached_path(path), "rb") as f:
            assert f.read() == data, path
    raw = _raw_log(srv)
    throttled = sum(e["fault"] == "throttle" for e in raw)
    late = statistics.median(e["in_flight"] for e in raw[len(raw) // 2:])
    assert throttled > 0 and late <= 20, (throttled, late)
    figures.update(files=len(files), requests=len(raw), throttled=throttled, in_flight_median_2nd_half=late)


def test_a_prefetch_starts_threads_as_the_limiter_allows_requests_not_all_at_once(tmp_path, make_server_process,
                                                                                   figures, monkeypatch):
    """Left to the limiter, a prefetch by the thread engine (where the event-loop one cannot run) may use up to its
    ceiling (256) of threads, but runs only the limit plus a quarter (32 + 8 at first): a thread with no slot to
    take would only add GIL hand-offs. As answers come back fast and the limit grows, more threads start."""
    monkeypatch.setenv("STREAMLOADER_PREFETCH_ENGINE", "threads")
    root = tmp_path / "repo"
    files = _tree(root, 600)
    srv = make_server_process(root, token=TOKEN, faults=ServerFaults(latency=0.2, concurrency_limit=128))
    repo = RemoteRepo(DagsHubClient(srv.repo_url, token=TOKEN, retry=FAST), FileCache(str(tmp_path / "cache")))
    repo.revision()
    assert repo.client.limiter.current_limit() == 32  # a fresh host starts there
    counts = []
    job = repo.prefetch(sorted(files), progress=False, processes=1, wait=False)
    started = time.monotonic()
    while not job.done():
        alive = sum(t.name.startswith("streamloader-prefetch_") for t in threading.enumerate())
        counts.append((time.monotonic() - started, alive))
        time.sleep(0.01)
    result = job.result()
    assert result.failed == {} and result.downloaded == len(files), result
    early = [n for t, n in counts if t < 0.15]  # before any answer (200 ms each) could raise the limit
    assert early and max(early) <= 40, counts[:20]
    assert max(n for _t, n in counts) > 40, counts  # and more once the limit grew
    figures.update(files=len(files), threads_first_150ms=max(early), threads_max=max(n for _t, n in counts))
