"""Issue 8.2 — SIGKILL a process in the middle of prefetching many files, then run again.

The victim is the real CLI (``python -m streamloader prefetch``) in its own process; a poller thread here reads
every finished cache object the whole time (a partial file must never become readable, fsspec #639/#1126); the
rerun must not be blocked or confused by the dead process's temp and lock files (webdataset #503,
mosaicml/streaming #781). The single-file, in-process version lives in tests/test_cache.py.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List

import pytest

from _helpers import git_blob_sha1
from conftest import TOKEN
from reliability.conftest import check_cache

N_FILES = 160
FILE_SIZE = 48_000


class CachePoller(threading.Thread):
    """Verifies every finished object of a cache root, over and over, until stopped; records what it saw."""

    def __init__(self, root: str):
        super().__init__(daemon=True)
        self.root = root
        self.stop_event = threading.Event()
        self.rounds = 0
        self.max_objects = 0
        self.max_temps = 0
        self.errors: List[str] = []

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                objects, temps = check_cache(self.root)
            except AssertionError as exc:  # a partial or corrupt object was visible
                self.errors.append(str(exc))
                return
            except FileNotFoundError:  # the cache root is being created
                objects, temps = 0, []
            self.rounds += 1
            self.max_objects = max(self.max_objects, objects)
            self.max_temps = max(self.max_temps, len(temps))
            time.sleep(0.005)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(10)


def _prefetch_cmd(srv_url: str, cache: str) -> List[str]:
    return [sys.executable, "-m", "streamloader", "prefetch", "dagshub://user/repo/data", "--host", srv_url,
            "--cache-dir", cache, "-j", "8"]


@pytest.fixture
def poller_of(request):
    """Factory: a started CachePoller of a cache root, always stopped when the test ends (a poller left running
    would go on reading that cache during the tests that follow)."""
    pollers: List[CachePoller] = []

    def start(root: str) -> CachePoller:
        poller = CachePoller(root)
        pollers.append(poller)
        poller.start()
        return poller

    yield start
    for poller in pollers:
        poller.stop()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("engine", ["threads", "loop"])
def test_sigkill_mid_prefetch_then_rerun_completes_without_partial_files(tmp_path, make_server, figures, poller_of,
                                                                         engine):
    """``threads`` streams every body to a temp file, so a kill always leaves some behind (the sweep is checked);
    ``loop`` (the event-loop engine, the default) holds a small body in memory until it is verified, so a kill may
    leave none — what it leaves must still be the dead process's alone."""
    root = tmp_path / "repo"
    (root / "data").mkdir(parents=True)
    blobs: Dict[str, bytes] = {}
    for i in range(N_FILES):
        data = os.urandom(FILE_SIZE + i)
        (root / "data" / f"f{i:04d}.bin").write_bytes(data)
        blobs[f"data/f{i:04d}.bin"] = data
    by_sha = {git_blob_sha1(d): p for p, d in blobs.items()}
    srv = make_server(root, token=TOKEN)
    srv.faults.latency = 0.05  # keeps 8 downloads in flight at any moment: there is always something to interrupt
    srv.faults.drop_rate = 0.05  # and some bodies arrive cut off, to be retried
    cache = str(tmp_path / "cache")
    env = {**os.environ, "DAGSHUB_TOKEN": TOKEN, "STREAMLOADER_PREFETCH_ENGINE": engine}
    poller = poller_of(cache)
    started = time.monotonic()
    victim_log = open(tmp_path / "victim.log", "w+")  # a file, not a pipe: a full pipe would stall the victim
    victim = subprocess.Popen(_prefetch_cmd(srv.url, cache), env=env, stdout=victim_log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        # kill once a real share of the work is done, but well before the end
        while poller.max_objects < N_FILES // 4 and victim.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if victim.poll() is not None:
            victim_log.seek(0)
            pytest.fail(f"the prefetch ended (exit {victim.returncode}) before it could be killed: {victim_log.read()}")
        os.kill(victim.pid, signal.SIGKILL)
        assert victim.wait(10) == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
        victim_log.close()
    done_before, leftovers = check_cache(cache)
    assert 0 < done_before < N_FILES
    assert all(f".{victim.pid}." in name for name in leftovers)  # the dead process's downloads, and only them
    if engine == "threads":
        assert leftovers, "a kill mid-download must leave the streamed temp files this test sweeps"
    locks = sum(len(files) for _d, _s, files in os.walk(os.path.join(cache, "locks")))
    cached_before = {name for _d, _s, files in os.walk(os.path.join(cache, "objects")) for name in files}

    srv.reset_counts()
    rerun = subprocess.run(_prefetch_cmd(srv.url, cache), env=env, capture_output=True, text=True, timeout=120)
    poller.stop()
    assert rerun.returncode == 0, rerun.stderr
    assert not poller.errors, poller.errors
    done_after, _temps = check_cache(cache)
    assert done_after == N_FILES
    # every file is there, byte for byte
    for dirpath, _dirs, files in os.walk(os.path.join(cache, "objects")):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                assert f.read() == blobs[by_sha[name]]
    # the rerun downloaded exactly what was missing: finished files were trusted, half-done ones started over
    gets = {p: n for p, n in srv.get_counts(kind="raw").items()}
    ok_gets = {e["path"] for e in srv.request_log if e["kind"] == "raw" and not e["fault"]}
    for path, data in blobs.items():
        if git_blob_sha1(data) in cached_before:
            assert path not in gets, f"{path} was downloaded again"
        else:
            assert path in ok_gets, f"{path} was never downloaded"
    # the dead process's temp files are swept by the documented maintenance path, and only they are
    from streamloader.cache import FileCache

    swept = FileCache(cache).prune()["temp_removed"]
    assert swept == len(leftovers) and check_cache(cache) == (N_FILES, [])
    figures.update(engine=engine, files=N_FILES, done_at_kill=done_before, temp_files_at_kill=len(leftovers), lock_files=locks,
                   poller_rounds=poller.rounds, rerun_gets=sum(gets.values()), processes=2,
                   wall_s=round(time.monotonic() - started, 1))
