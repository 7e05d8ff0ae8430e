"""FileCache: atomic, verified, shared by threads and processes, keyed safely, capped with LRU eviction."""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import signal
import stat
import threading
import time

import pytest
from hypothesis import given, settings, strategies as st

from _helpers import git_key
from streamloader.cache import CacheKey, FileCache, cache_info, parse_size, prune
from streamloader.errors import IntegrityError


def writer(data: bytes, counter: list = None, chunk: int = 1000, delay: float = 0.0):
    def fill(f):
        if counter is not None:
            counter.append(1)
        for i in range(0, len(data), chunk):
            f.write(data[i:i + chunk])
            if delay:
                time.sleep(delay)
    return fill


def test_fetch_stores_verified_file_and_reuses_it(tmp_path):
    cache = FileCache(str(tmp_path / "c"))
    data = os.urandom(5000)
    calls = []
    path = cache.fetch(git_key(data), writer(data, calls), size=len(data))
    assert open(path, "rb").read() == data
    assert cache.fetch(git_key(data), writer(data, calls), size=len(data)) == path
    assert len(calls) == 1
    assert path.startswith(cache.root + os.sep)


def test_size_and_hash_mismatch_are_rejected_and_leave_nothing(tmp_path):
    cache = FileCache(str(tmp_path / "c"))
    data = b"hello world"
    with pytest.raises(IntegrityError, match="expected 11"):
        cache.fetch(git_key(data), writer(data[:5]), size=len(data))
    with pytest.raises(IntegrityError, match="hash mismatch"):
        cache.fetch(git_key(data), writer(b"HELLO WORLD"), size=len(data))
    assert cache.get(git_key(data)) is None
    assert os.listdir(os.path.join(cache.root, "tmp")) == []
    assert cache.info()["files"] == 0


def test_md5_keys_are_verified(tmp_path):
    cache = FileCache(str(tmp_path / "c"))
    data = b"dvc-tracked bytes"
    key = CacheKey.from_hash("dvc", hashlib.md5(data).hexdigest())
    assert key.kind == "md5"
    assert open(cache.fetch(key, writer(data), len(data)), "rb").read() == data
    bad = CacheKey.from_hash("dvc", hashlib.md5(b"other").hexdigest())
    with pytest.raises(IntegrityError):
        cache.fetch(bad, writer(data), len(data))


def test_failed_fill_propagates_and_a_retry_succeeds(tmp_path):
    cache = FileCache(str(tmp_path / "c"))
    data = b"x" * 100

    def broken(f):
        f.write(b"partial")
        raise ConnectionError("boom")

    with pytest.raises(ConnectionError):
        cache.fetch(git_key(data), broken, len(data))
    assert cache.get(git_key(data)) is None
    assert open(cache.fetch(git_key(data), writer(data), len(data)), "rb").read() == data


def test_threads_share_one_download(tmp_path):
    cache = FileCache(str(tmp_path / "c"))
    data = os.urandom(200_000)
    calls, results, errors = [], [], []

    def reader():
        try:
            results.append(open(cache.fetch(git_key(data), writer(data, calls, 10_000, 0.005), len(data)), "rb").read())
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(calls) == 1
    assert results == [data] * 8


def test_the_threads_locks_of_entries_live_only_while_in_use(tmp_path):
    """Threads share one lock per entry while any of them holds or waits for it; none is kept after (one per file
    read, kept for good, grew a process reading the user's 540k files by ~0.4 GB)."""
    import gc

    cache = FileCache(str(tmp_path / "c"))
    blobs = [os.urandom(2000 + i) for i in range(300)]
    for data in blobs:
        with cache.open(git_key(data), writer(data, [], 1000, 0), len(data)) as f:
            assert f.read() == data
    cache.flush(10)
    gc.collect()
    assert len(cache._local_locks) == 0
    key = git_key(blobs[0])
    held = cache._thread_lock(key)
    assert cache._thread_lock(key) is held  # the same lock while someone has it
    with cache.locked(key):  # the cross-process lock on top: another thread waits on the same thread lock
        assert held.locked() and cache._thread_lock(key) is held
    assert len(cache._local_locks) == 1
    del held
    gc.collect()
    assert len(cache._local_locks) == 0


def _proc_fetch(root, data, marker_dir, out):
    cache = FileCache(root)

    def fill(f):
        open(os.path.join(marker_dir, f"call-{os.getpid()}"), "w").close()
        for i in range(0, len(data), 20_000):
            f.write(data[i:i + 20_000])
            time.sleep(0.01)

    path = cache.fetch(git_key(data), fill, len(data))
    with open(out, "wb") as f:
        f.write(open(path, "rb").read())


def test_processes_share_one_download(tmp_path):
    root, markers = str(tmp_path / "c"), tmp_path / "markers"
    markers.mkdir()
    data = os.urandom(300_000)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_proc_fetch, args=(root, data, str(markers), str(tmp_path / f"out{i}")))
             for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(os.listdir(markers)) == 1
    for i in range(4):
        assert (tmp_path / f"out{i}").read_bytes() == data


def _slow_fill_forever(root, data):
    cache = FileCache(root)

    def fill(f):
        f.write(data[:1000])
        f.flush()
        time.sleep(60)

    cache.fetch(git_key(data), fill, len(data))


def _start_hung_download(root, data, cache):
    """A spawned process that starts downloading ``data`` into the cache at ``root`` and never finishes; returns
    once its temp file exists (``cache`` must not show the entry meanwhile)."""
    p = mp.get_context("spawn").Process(target=_slow_fill_forever, args=(root, data))
    p.start()
    tmp = os.path.join(root, "tmp")
    deadline = time.time() + 30
    while not (os.path.isdir(tmp) and os.listdir(tmp)):
        assert cache.get(git_key(data)) is None
        assert time.time() < deadline, "child never started writing"
        time.sleep(0.02)
    return p


def test_sigkilled_download_leaves_nothing_readable_and_does_not_block(tmp_path):
    root = str(tmp_path / "c")
    data = os.urandom(10_000)
    cache = FileCache(root, lock_timeout=20)
    p = _start_hung_download(root, data, cache)
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    assert cache.get(git_key(data)) is None  # the partial temp file is never visible as data
    t0 = time.time()
    path = cache.fetch(git_key(data), writer(data), len(data))  # the dead holder's lock does not block
    assert time.time() - t0 < 10
    assert open(path, "rb").read() == data
    assert cache.prune()["temp_removed"] == 1
    assert os.listdir(os.path.join(root, "tmp")) == []


def test_waiting_for_a_hung_holder_times_out_with_a_clear_error(tmp_path):
    root = str(tmp_path / "c")
    data = os.urandom(10_000)
    cache = FileCache(root, lock_timeout=0.3)
    p = _start_hung_download(root, data, cache)
    try:
        filled = []
        t0 = time.monotonic()
        with pytest.raises(IntegrityError, match="timed out after 0.3s waiting for another process"):
            cache.fetch(git_key(data), lambda f: filled.append(f.write(data)), len(data))
        assert 0.3 <= time.monotonic() - t0 < 10
        assert filled == []  # never downloaded behind the holder's back
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.join()


def test_reader_never_sees_partial_file(tmp_path):
    cache = FileCache(str(tmp_path / "c"))
    data = os.urandom(400_000)
    key = git_key(data)
    seen, stop = [], threading.Event()

    def poll():
        while not stop.is_set():
            p = cache.get(key)
            if p is not None:
                seen.append(len(open(p, "rb").read()))

    t = threading.Thread(target=poll)
    t.start()
    cache.fetch(key, writer(data, chunk=10_000, delay=0.002), len(data))
    time.sleep(0.05)
    stop.set()
    t.join()
    assert seen and set(seen) == {len(data)}


def test_lru_eviction_under_cap_keeps_open_readers_working(tmp_path):
    cache = FileCache(str(tmp_path / "c"), max_size=25_000)
    blobs = [os.urandom(10_000) for _ in range(5)]
    first = cache.open(git_key(blobs[0]), writer(blobs[0]), 10_000)
    for b in blobs[1:]:
        cache.fetch(git_key(b), writer(b), len(b))
        time.sleep(0.01)
    info = cache.info()
    assert info["bytes"] <= 25_000
    assert cache.get(git_key(blobs[-1])) is not None  # the newest entry survives
    assert cache.get(git_key(blobs[0])) is None  # the oldest was evicted...
    assert first.read() == blobs[0]  # ...but its open reader still reads every byte
    first.close()


def _cached_bytes(root):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _s, fs in os.walk(os.path.join(root, "objects")) for f in fs)


def test_a_capped_cache_does_not_rescan_itself_for_every_stored_file(tmp_path, monkeypatch):
    cache = FileCache(str(tmp_path / "c"), max_size=150_000)
    scans = []
    real_entries = FileCache._entries

    def counting_entries(self):
        scans.append(1)
        return real_entries(self)

    monkeypatch.setattr(FileCache, "_entries", counting_entries)
    for i in range(200):
        data = os.urandom(1000)
        cache.fetch(git_key(data), writer(data), len(data))
        assert _cached_bytes(cache.root) <= 150_000
    assert 2 <= len(scans) <= 10  # the first store, then only when the running total passes the cap


def test_a_capped_cache_sees_what_other_processes_added_after_the_rescan_interval(tmp_path, monkeypatch):
    import streamloader.cache.writing as cache_module

    monkeypatch.setattr(cache_module, "_USAGE_RESCAN", 0.2)
    root = str(tmp_path / "c")
    mine, other = FileCache(root, max_size=100_000), FileCache(root)   # ``other`` stands for another process
    first = os.urandom(1000)
    mine.fetch(git_key(first), writer(first), len(first))             # mine's running total: 1000 bytes
    for _ in range(120):
        data = os.urandom(1000)
        other.fetch(git_key(data), writer(data), len(data))
    assert _cached_bytes(root) == 121_000
    time.sleep(0.25)
    data = os.urandom(1000)
    mine.fetch(git_key(data), writer(data), len(data))
    assert _cached_bytes(root) <= 90_000                              # rescanned, evicted down to 90% of the cap
    assert mine.get(git_key(data)) is not None                         # never the file just stored


def test_eviction_skips_entries_being_downloaded(tmp_path):
    root = str(tmp_path / "c")
    cache = FileCache(root)
    data = os.urandom(1000)
    key = git_key(data)
    cache.fetch(key, writer(data), len(data))
    lock = cache._file_lock(key)
    lock.acquire()
    try:
        assert FileCache(root).prune(0)["removed"] == 0
    finally:
        lock.release()
    assert FileCache(root).prune(0)["removed"] == 1


def test_permissions_are_private(tmp_path):
    cache = FileCache(str(tmp_path / "c"))
    data = b"secret-ish"
    path = cache.fetch(git_key(data), writer(data), len(data))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o400  # read-only: see tests/reliability/test_cache_hardening.py
    for sub in ("", "objects", "tmp", "locks"):
        assert stat.S_IMODE(os.stat(os.path.join(cache.root, sub)).st_mode) == 0o700


def test_env_default_info_prune_and_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMLOADER_CACHE", str(tmp_path / "envcache"))
    cache = FileCache()
    assert cache.root == str(tmp_path / "envcache")
    for i in range(3):
        d = bytes([i]) * 1000
        cache.fetch(git_key(d), writer(d), len(d))
    assert cache_info()["files"] == 3 and cache_info()["bytes"] == 3000
    assert prune("2kB")["removed"] == 1  # 3000 bytes -> at most 2000
    assert cache.clear() == 2
    assert cache_info()["files"] == 0


def test_parse_size():
    assert parse_size("10GB") == 10_000_000_000
    assert parse_size("512MiB") == 512 * 1024 ** 2
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="invalid size"):
        parse_size("ten gigs")


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=300), st.text(max_size=80))
def test_any_key_maps_inside_the_cache_root(tmp_path_factory, path, hash_value):
    cache = FileCache(str(tmp_path_factory.getbasetemp() / "prop-cache"))
    for key in (CacheKey.from_location("https://h", "o", "r", "sha", path), CacheKey.from_hash("git", hash_value)):
        target = os.path.realpath(cache.path_for(key))
        assert target.startswith(os.path.realpath(cache.root) + os.sep)
        assert ".." not in os.path.relpath(target, cache.root).split(os.sep)
