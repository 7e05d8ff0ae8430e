"""The event-loop prefetch engine (streamloader/remote/aioprefetch.py) against the real local server: what it
downloads itself, what it hands to the thread path, and that the cache's guarantees hold either way (verified,
atomic, one download per file across processes, token only to the API origin, the host's limiter obeyed)."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from conftest import TOKEN, make_random_files, remote_repo
from streamloader.remote import aioprefetch
from streamloader.remote.client import RetryPolicy
from streamloader.server import DagsHubLike, ServerFaults

FAST = RetryPolicy(attempts=8, initial_backoff=0.01, max_backoff=0.05, max_retry_after=0.5)


@pytest.fixture
def files(tmp_path):
    return make_random_files(tmp_path / "src", count=120)


def _run(repo, paths, workers=64, cancelled=None):
    out = {}

    def record(path, size, exc, cached):
        assert path not in out, f"{path} reported twice"
        out[path] = (size, exc, cached)

    counts = aioprefetch.prefetch_async(repo, list(paths), workers, record, cancelled)
    return out, counts


def _cached_bytes(repo, path):
    with open(repo.local_path(path), "rb") as f:
        return f.read()


def test_the_loop_downloads_every_file_once_verified_and_a_second_run_finds_them_cached(tmp_path, files,
                                                                                         make_server):
    srv = make_server(tmp_path / "src", token=TOKEN)
    repo = remote_repo(srv, tmp_path / "cache", FAST)
    repo.ls("data")  # hashes and sizes known, as after any listing
    assert aioprefetch.unusable(repo) is None
    srv.reset_counts()
    lookups: list = []
    repo.store._conn().set_trace_callback(lambda sql: lookups.append(sql) if "FROM entries" in sql else None)
    out, counts = _run(repo, files)
    assert counts.in_loop == len(files) and counts.given_back == 0, counts
    # what the store knows of the 120 files came in one query (primed), not in one or two per file
    assert 1 <= len(lookups) <= 3, lookups
    repo.store._conn().set_trace_callback(None)
    assert all(exc is None and not cached and size == len(files[p]) for p, (size, exc, cached) in out.items())
    assert srv.request_count(kind="raw") == len(files)  # one GET per file, nothing else
    raw = [e for e in srv.request_log if e["kind"] == "raw"]
    assert all(e["has_auth"] for e in raw) and max(e["in_flight"] for e in raw) > 1
    srv.reset_counts()
    for path, data in files.items():
        assert _cached_bytes(repo, path) == data
    assert srv.request_count(kind="raw") == 0
    out, counts = _run(repo, files)
    assert counts.cached == len(files) and all(cached for _s, _e, cached in out.values())
    assert srv.request_count(kind="raw") == 0


def test_the_loop_commits_its_own_files_in_batches_not_through_the_background_queue(tmp_path, files, make_server,
                                                                                    monkeypatch):
    """The background queue's thread would take the interpreter's lock from the loop for each system call of each
    commit: the loop lands its files itself, a batch at a time, each batch with one sync (in a thread of its own:
    the one step that waits for the disk), and reports each file once it is in place (a worker process stopped by
    a cancel must never have reported one it then lost)."""
    from streamloader.cache import writing
    from streamloader.cache.commit_queue import QUEUE

    srv = make_server(tmp_path / "src", token=TOKEN)
    repo = remote_repo(srv, tmp_path / "cache", FAST)
    repo.ls("data")
    syncs, fsyncs, queued, renames, loop_thread = [], [], [], [], []
    real_sync, real_fsync, real_submit, real_rename = (writing.sync_files, os.fsync, QUEUE.submit,
                                                       writing.rename_into_place)
    inside = threading.local()  # (a sync of one file is an fsync: counted once, as that sync)

    def sync(fds):
        syncs.append((threading.get_ident(), len(fds)))
        inside.on = True
        try:
            return real_sync(fds)
        finally:
            inside.on = False

    monkeypatch.setattr(writing, "sync_files", sync)
    monkeypatch.setattr(os, "fsync", lambda fd: (None if getattr(inside, "on", False) else fsyncs.append(fd),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(QUEUE, "submit", lambda task: (queued.append(task), real_submit(task))[1])
    monkeypatch.setattr(writing, "rename_into_place",
                        lambda tmp, final: (renames.append(threading.get_ident()), real_rename(tmp, final))[1])

    def record(path, size, exc, cached):
        loop_thread.append(threading.get_ident())
        assert exc is None and not cached
        assert repo.cached_path(path) is not None  # reported once it is in place, never before

    counts = aioprefetch.prefetch_async(repo, list(files), 64, record)
    assert counts.in_loop == len(files)
    assert queued == []
    assert len(renames) == len(files) and set(renames) == set(loop_thread)  # put in place in the loop's thread
    assert sum(n for _tid, n in syncs) + len(fsyncs) == len(files)
    assert len(syncs) + len(fsyncs) <= len(files) // 2, (syncs, fsyncs)  # batches, not a sync per file
    for path, data in files.items():
        assert _cached_bytes(repo, path) == data
    assert os.listdir(os.path.join(repo.cache.root, "tmp")) == []
    gc.collect()
    assert len(repo.cache._local_locks) == 0  # the threads' entry locks go once unused (not one kept per file)


def test_unlisted_paths_are_fetched_under_their_location_and_missing_ones_fail_typed(tmp_path, files, make_server):
    srv = make_server(tmp_path / "src", token=TOKEN)
    repo = remote_repo(srv, tmp_path / "cache", FAST)  # nothing listed: no hash, no size known
    paths = list(files)[:20] + ["data/nope.bin"]
    out, counts = _run(repo, paths)
    assert counts.in_loop == 20
    assert isinstance(out["data/nope.bin"][1], FileNotFoundError)  # the 404 went to warm(), which says so
    for path in paths[:20]:
        assert out[path][1] is None and _cached_bytes(repo, path) == files[path]


def test_faults_go_to_the_thread_path_and_every_file_still_arrives_intact(tmp_path, files, make_server):
    srv = make_server(tmp_path / "src", token=TOKEN)
    repo = remote_repo(srv, tmp_path / "cache", FAST)
    repo.ls("data")
    srv.update_faults(dict(error_rate=0.1, drop_rate=0.1, throttle_rate=0.05, retry_after=0.05, seed=7))
    out, counts = _run(repo, files)
    assert not [p for p, (_s, exc, _c) in out.items() if exc is not None]
    assert counts.given_back > 0 and counts.in_loop + counts.given_back == len(files), counts
    srv.update_faults(dict(error_rate=0.0, drop_rate=0.0, throttle_rate=0.0))
    for path, data in files.items():
        assert _cached_bytes(repo, path) == data
    with pytest.raises(Exception):  # nothing unverified or partial was left in tmp/
        next(p for p in os.listdir(tmp_path / "cache" / "tmp") if p.endswith(".part"))


def test_a_server_that_lies_about_the_bytes_never_gets_them_cached(tmp_path, files, make_server):
    srv = make_server(tmp_path / "src", token=TOKEN)
    repo = remote_repo(srv, tmp_path / "cache", RetryPolicy(attempts=2, initial_backoff=0.01, max_backoff=0.02))
    repo.ls("data")
    victim = "data/f005.bin"
    (tmp_path / "src" / "data" / "f005.bin").write_bytes(b"x" * len(files[victim]))  # same size, other bytes
    out, counts = _run(repo, list(files)[:10])
    assert out[victim][1] is not None and "hash" in str(out[victim][1]).lower()
    assert counts.in_loop == 9 and counts.given_back == 1
    assert repo.cached_path(victim) is None


def test_dvc_files_come_through_presigned_redirects_without_the_token(tmp_path, repo_dir, serve):
    like = serve(dagshub_like=DagsHubLike(max_in_flight=0))
    repo = remote_repo(like, tmp_path / "cache", FAST)
    paths = [e.path for e in repo.ls("data") if not e.is_dir]
    assert any(repo.store.entry(p).versioning == "dvc" for p in paths)
    like.reset_counts()
    out, counts = _run(repo, paths)
    assert counts.in_loop == len(paths) and counts.given_back == 0, counts
    presigned = [e for e in like.request_log if e["kind"] == "presigned"]
    assert presigned and not any(e["has_auth"] for e in presigned)  # the storage origin never saw the token
    for path in paths:
        assert _cached_bytes(repo, path) == (repo_dir / path).read_bytes()


def test_the_engine_takes_no_more_slots_than_the_host_limiter_allows(tmp_path, files, make_server, monkeypatch):
    monkeypatch.setenv("STREAMLOADER_HOST_LIMITS", "initial=4,ceiling=4,floor=1")
    monkeypatch.setenv("STREAMLOADER_LIMITS_DIR", str(tmp_path / "limits"))
    srv = make_server(tmp_path / "src", token=TOKEN, faults=ServerFaults(latency=0.02))
    repo = remote_repo(srv, tmp_path / "cache", FAST)
    repo.ls("data")
    srv.reset_counts()
    out, counts = _run(repo, list(files)[:40], workers=64)
    assert counts.in_loop == 40
    assert max(e["in_flight"] for e in srv.request_log if e["kind"] == "raw") <= 4


def test_cancel_stops_early_and_leaves_only_whole_files(tmp_path, files, make_server):
    srv = make_server(tmp_path / "src", token=TOKEN, faults=ServerFaults(latency=0.05))
    repo = remote_repo(srv, tmp_path / "cache", FAST)
    repo.ls("data")
    stop = threading.Event()
    seen = []

    def record(path, size, exc, cached):
        seen.append(path)
        if len(seen) == 5:
            stop.set()

    aioprefetch.prefetch_async(repo, list(files), 8, record, stop)
    assert 5 <= len(seen) < len(files)
    for path, data in files.items():
        local = repo.cached_path(path)
        if local is not None:
            with open(local, "rb") as f:
                assert f.read() == data


def test_the_thread_engine_is_chosen_when_asked_for(tmp_path, files, make_server, monkeypatch):
    srv = make_server(tmp_path / "src", token=TOKEN)
    repo = remote_repo(srv, tmp_path / "cache", FAST)
    monkeypatch.setenv(aioprefetch.ENGINE_ENV, "threads")
    assert "threads" in aioprefetch.unusable(repo)
    monkeypatch.delenv(aioprefetch.ENGINE_ENV)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # a proxy applies: requests' job
    monkeypatch.setenv("NO_PROXY", "")
    fresh = remote_repo(srv, tmp_path / "cache2", FAST)
    assert "proxy" in aioprefetch.unusable(fresh)


def test_the_thread_engine_primes_the_lookups_of_its_list_too(tmp_path, files, make_server):
    from streamloader.remote.prefetch import prefetch_in_threads

    srv = make_server(tmp_path / "src", token=TOKEN)
    repo = remote_repo(srv, tmp_path / "cache", FAST)
    repo.ls("data")
    lookups: list = []
    repo.store._conn().set_trace_callback(lambda sql: lookups.append(sql) if "FROM entries" in sql else None)
    out = {}
    prefetch_in_threads(repo, list(files), 16, lambda path, size, exc, cached: out.update({path: (size, exc)}))
    repo.store._conn().set_trace_callback(None)
    assert all(exc is None and size == len(files[p]) for p, (size, exc) in out.items()) and len(out) == len(files)
    assert 1 <= len(lookups) <= 3, lookups  # one query for the 120 files (not one per file)


def test_two_processes_prefetching_the_same_files_download_each_once(tmp_path, files, make_server):
    srv = make_server(tmp_path / "src", token=TOKEN, faults=ServerFaults(latency=0.04))
    script = textwrap.dedent("""
        import json, sys
        sys.path.insert(0, sys.argv[3])
        from conftest import remote_repo
        from streamloader.remote import aioprefetch
        repo = remote_repo(type("S", (), {"repo_url": sys.argv[1]})(), sys.argv[2])
        paths = [e.path for e in repo.ls("data")]
        import streamloader.remote.leanhttp  # noqa: F401 - imported before the start line: both start at once
        print("ready", flush=True)
        sys.stdin.readline()  # both start at once
        bad = []
        counts = aioprefetch.prefetch_async(repo, paths, 8, lambda p, s, e, c: e is not None and bad.append(p))
        print(json.dumps({"bad": bad, "in_loop": counts.in_loop, "given_back": counts.given_back}))
    """)
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "DAGSHUB_TOKEN": TOKEN}
    procs = [subprocess.Popen([sys.executable, "-c", script, srv.repo_url, str(tmp_path / "cache"), tests_dir],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True) for _ in range(2)]
    assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
    srv.reset_counts()
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert not results[0]["bad"] and not results[1]["bad"]
    per_file = [srv.request_count(path, kind="raw") for path in files]
    assert per_file == [1] * len(files)  # each file crossed the network once, whoever asked
    assert sum(r["in_loop"] for r in results) == len(files)
    assert min(r["in_loop"] for r in results) > 0, results  # they overlapped: each downloaded some


def test_files_too_large_for_memory_go_to_warm_without_a_wasted_request(tmp_path, files, make_server,
                                                                        monkeypatch):
    monkeypatch.setattr(aioprefetch, "IN_MEMORY_MAX", 3000)
    srv = make_server(tmp_path / "src", token=TOKEN)
    repo = remote_repo(srv, tmp_path / "cache", FAST)
    repo.ls("data")
    srv.reset_counts()
    paths = list(files)[:60]
    out, counts = _run(repo, paths)
    small = [p for p in paths if len(files[p]) <= 3000]
    assert counts.in_loop == len(small) and counts.given_back == len(paths) - len(small) > 0, counts
    assert [srv.request_count(p, kind="raw") for p in paths] == [1] * len(paths)  # none asked twice
    for path in paths:
        assert _cached_bytes(repo, path) == files[path]


def test_expired_presigned_links_are_fetched_again_by_the_thread_path(tmp_path, repo_dir, serve):
    like = serve(dagshub_like=DagsHubLike(max_in_flight=0, expire_first=3))
    repo = remote_repo(like, tmp_path / "cache", FAST)
    paths = [e.path for e in repo.ls("data") if not e.is_dir]
    out, counts = _run(repo, paths)
    assert not [p for p, (_s, exc, _c) in out.items() if exc is not None]
    assert counts.given_back >= 1 and counts.in_loop + counts.given_back == len(paths), counts
    for path in paths:
        assert _cached_bytes(repo, path) == (repo_dir / path).read_bytes()


def test_a_server_that_leaves_nagle_on_costs_no_delayed_ack_per_file(tmp_path, files, make_server, monkeypatch):
    """Nagle on the server + delayed ACKs on a reused connection = ~40 ms more per small answer; the loop's
    requests switch quick-ACK on once sent, so one request at a time costs the latency (20 ms), not 60 ms."""
    import time

    srv = make_server(tmp_path / "src", token=TOKEN, faults=ServerFaults(latency=0.02, nagle=True))
    repo = remote_repo(srv, tmp_path / "cache", FAST)
    repo.ls("data")
    paths = list(files)[:25]
    started = time.perf_counter()
    out, counts = _run(repo, paths, workers=1)  # one connection, reused for every file
    per_file = (time.perf_counter() - started) / len(paths)
    assert counts.in_loop == len(paths)
    assert per_file < 0.045, per_file  # ~22 ms each; with delayed ACKs ~62 ms


def test_a_server_that_drips_bytes_cannot_hold_the_loop(tmp_path, files, make_server):
    """One byte every 0.2 s: the loop's budget (connect + read timeout + size / min_rate) ends the request, warm()
    then meets the same drip and its own deadline; the prefetch ends with typed failures, never a hang."""
    import time

    from streamloader.errors import RemoteError

    srv = make_server(tmp_path / "src", token=TOKEN, faults=ServerFaults(drip_rate=1.0, drip_interval=0.2))
    policy = RetryPolicy(attempts=2, initial_backoff=0.01, max_backoff=0.02, connect_timeout=1.0, read_timeout=0.5,
                         max_time=5.0)
    repo = remote_repo(srv, tmp_path / "cache", policy)
    repo.ls("data")
    started = time.monotonic()
    out, counts = _run(repo, list(files)[:3], workers=3)
    assert time.monotonic() - started < 60 + 30
    assert counts.in_loop == 0 and counts.given_back == 3
    assert all(isinstance(exc, RemoteError) for _s, exc, _c in out.values()), out
    assert all(repo.cached_path(p) is None for p in out)


def test_a_program_that_ends_while_its_background_prefetch_waits_exits_at_once(tmp_path, files, make_server):
    """``prefetch(wait=False)`` and then the program ends: the prefetch is abandoned (what it left half done is
    swept later), as the thread engine's daemon threads are. Here every file is held by another cache handle, so
    the fallback threads wait on the entry locks (up to the cache's 10-minute lock timeout): the exit must not."""
    import time

    srv = make_server(tmp_path / "src", token=TOKEN)
    script = textwrap.dedent("""
        import sys, time
        sys.path.insert(0, sys.argv[3])
        from conftest import remote_repo
        holder = remote_repo(type("S", (), {"repo_url": sys.argv[1]})(), sys.argv[2])
        repo = remote_repo(type("S", (), {"repo_url": sys.argv[1]})(), sys.argv[2])
        paths = [e.path for e in holder.ls("data")]
        claims = [holder.try_warm(p) for p in paths]  # another downloader holds every file's locks
        assert all(state == "claimed" for state, _claim in claims), claims
        job = repo.prefetch(paths, progress=False, processes=1, wait=False)
        import threading
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(  # the loop gave up waiting and handed files to warm()
                t.name.startswith("streamloader-prefetch_") for t in threading.enumerate()):
            time.sleep(0.05)
        time.sleep(0.5)
        assert not job.done(), job
        print("exiting", flush=True)
    """)
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "DAGSHUB_TOKEN": TOKEN}
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-c", script, srv.repo_url, str(tmp_path / "cache"), tests_dir],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "exiting", run.stderr[-2000:]
    assert time.monotonic() - started < 60 + 30


def test_answers_the_lean_client_leaves_to_requests_still_arrive_verified(tmp_path, files, make_server):
    """Raw answers without Content-Length (the body ends at the close) and with a forged header block: the loop
    gives those files to the thread path, which reads them whole; every byte is verified either way."""
    from reliability.hostile import HostileProxy

    import requests

    srv = make_server(tmp_path / "src", token=TOKEN)
    odd = {f"data/f{i:03d}.bin": kind for i, kind in enumerate(["unframed"] * 6 + ["smuggling"] * 4)}

    def intercept(path):
        name = next((p for p in odd if path.endswith("/" + p)), None)
        if name is None or "/raw/" not in path:
            return None
        body = requests.get(srv.url + path, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).content
        if odd[name] == "unframed":
            return 200, {}, body  # (sent as is, the connection closed after it)
        # a Content-Length that covers only part of what follows: the rest must never be read as an answer
        return 200, {"Content-Length": str(len(body))}, body + b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbad"

    with HostileProxy(srv.url, intercept=intercept) as proxy:
        repo = remote_repo(type("S", (), {"repo_url": f"{proxy.url}/user/repo"})(), tmp_path / "cache", FAST)
        repo.ls("data")
        out, counts = _run(repo, files)
    assert not [p for p, (_s, exc, _c) in out.items() if exc is not None]
    assert counts.given_back >= 6 and counts.in_loop + counts.given_back == len(files), counts
    for path, data in files.items():
        assert _cached_bytes(repo, path) == data
