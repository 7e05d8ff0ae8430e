"""Fork safety: _forksafe.register runs its handlers around a real fork, the library's handlers leave a child with
usable locks, and the library imports and caches where os.register_at_fork does not exist (as on Windows)."""
from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import List

import pytest

from _helpers import git_key, held_by_another_thread
from streamloader import _forksafe
from streamloader.cache import FileCache, entrylock
from streamloader.hooks import router

ROOT = Path(__file__).resolve().parents[1]
needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")

_CALLS: List[str] = []
_ARMED = False  # the handlers stay registered for the rest of the session: they record only while armed


def _record(name: str):
    def handler() -> None:
        if _ARMED:
            _CALLS.append(name)
    return handler


def test_register_needs_a_handler():
    with pytest.raises(TypeError):
        _forksafe.register()


@needs_fork
def test_each_handler_runs_on_its_side_of_a_real_fork():
    global _ARMED
    assert _forksafe.register(before=_record("before"), after_in_parent=_record("parent"),
                              after_in_child=_record("child")) is True
    read_end, write_end = os.pipe()
    _ARMED = True
    try:
        pid = os.fork()
        if pid == 0:  # the child: report what ran here, then leave without running pytest's cleanup
            try:
                os.close(read_end)
                os.write(write_end, ",".join(_CALLS).encode())
            finally:
                os._exit(0)
        parent_calls = list(_CALLS)
    finally:
        _ARMED = False
        _CALLS.clear()
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        child_calls = pipe.read().decode()
    _pid, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert parent_calls == ["before", "parent"]
    assert child_calls == "before,child"  # the child inherits what ``before`` recorded, then runs its own handler


def _use_locks_in_child(cache: FileCache, out) -> None:
    got = router.lock().acquire(timeout=10)
    data = b"stored in the child"
    path = cache.fetch(git_key(data), lambda f: f.write(data), len(data))  # takes the cache's thread-lock guard
    with open(path, "rb") as f:
        out.put((got, f.read()))


@needs_fork
def test_locks_another_thread_holds_at_fork_time_are_usable_in_the_child(tmp_path):
    cache = FileCache(str(tmp_path / "c"))
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    with held_by_another_thread(router.lock(), cache._local_guard):  # another thread is inside them at the fork
        child = ctx.Process(target=_use_locks_in_child, args=(cache, out))
        child.start()
        child.join(60)
        if child.exitcode is None:
            child.kill()
            child.join()
    assert child.exitcode == 0, "the child deadlocked on a lock another thread held at fork time"
    assert out.get(timeout=5) == (True, b"stored in the child")


_NO_FORK_SCRIPT = r"""
import hashlib, os, sys
del os.register_at_fork                       # as on a platform without fork()
if sys.argv[2] == "no-fcntl":
    sys.modules["fcntl"] = None               # and without fcntl: entry locks fall back to one lock file each
import streamloader.cache
from streamloader import _forksafe
from streamloader.cache import CacheKey, FileCache
import streamloader.remote.repo, streamloader.hooks.router   # every module that registers fork handlers

root = sys.argv[1]
cache = FileCache(root)
data = b"cached without fork"
key = CacheKey.from_hash("git", hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest())
assert cache.get(key) is None
path = cache.fetch(key, lambda f: f.write(data), len(data))
assert cache.get(key, len(data)) == path and open(path, "rb").read() == data
print(_forksafe.register(after_in_child=print), sorted(os.listdir(os.path.join(root, "locks"))))
"""


@pytest.mark.parametrize("locks", ["fcntl", "no-fcntl"])
def test_the_cache_imports_and_works_without_register_at_fork(tmp_path, locks):
    root = tmp_path / "c"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-W", "ignore::UserWarning", "-c", _NO_FORK_SCRIPT, str(root), locks],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    registered, lock_dir = run.stdout.split(" ", 1)
    assert registered == "False"  # nothing registered: there is no fork to make safe
    key = git_key(b"cached without fork")
    if locks == "no-fcntl":
        assert key.digest[:2] in lock_dir  # the per-entry lock file fallback was used
    elif entrylock._OFD is not None:
        assert "entries.lock" in lock_dir  # one shared byte-range lock file, as with fork


def _wait_child(pid: int, timeout: float) -> int:
    """The exit status of child ``pid`` (waitpid), or -1 if it is still running after ``timeout`` s (then killed)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return -1


@needs_fork
def test_a_fork_waits_for_a_no_fork_section_and_the_child_can_enter_one():
    """A fork never splits a ``NO_FORK`` section (where another thread may hold SQLite's process-wide mutexes),
    and the child, whose copy of the gate was taken by the forking thread, can enter one at once."""
    import time

    entered, leaving = threading.Event(), threading.Event()

    def section() -> None:
        with _forksafe.NO_FORK:
            entered.set()
            time.sleep(1.0)
            leaving.set()

    worker = threading.Thread(target=section)
    worker.start()
    assert entered.wait(10)
    pid = os.fork()
    if pid == 0:  # the child: a section must not hang here
        with _forksafe.NO_FORK:
            pass
        os._exit(0 if _forksafe.NO_FORK.inside == 0 else 1)
    over = leaving.is_set()  # read first thing after the fork: it happened only once the section was over
    worker.join()
    assert over
    assert _wait_child(pid, 20) == 0


@needs_fork
def test_the_wait_before_a_fork_is_bounded():
    import time

    gate = _forksafe.ForkGate(wait=0.3)
    entered, done = threading.Event(), threading.Event()

    def stuck() -> None:
        with gate:
            entered.set()
            done.wait(10)

    worker = threading.Thread(target=stuck)
    worker.start()
    try:
        assert entered.wait(10)
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        assert 0.25 <= time.monotonic() - started < 5
        assert _wait_child(pid, 20) == 0
    finally:
        done.set()
        worker.join()
    with gate:  # the parent's gate works on after the fork
        assert gate.inside == 1
