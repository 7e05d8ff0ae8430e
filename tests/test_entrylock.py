"""EntryLock: one byte-range lock per entry in a shared file (Linux), per-entry flock files elsewhere."""
from __future__ import annotations

import os
import sys

import pytest

from streamloader.cache import entrylock as _entrylock
from streamloader.cache.entrylock import SHARED_LOCK_FILE, EntryLock, Timeout

DIGEST_A = "a" * 40
DIGEST_B = "b" * 40


@pytest.fixture(params=["ofd", "flock-files"])
def mode(request, monkeypatch, tmp_path):
    locks = str(tmp_path / "locks")
    os.makedirs(locks)
    if request.param == "ofd":
        if _entrylock._OFD is None:
            pytest.skip("no open-file-description locks on this platform")
    else:
        monkeypatch.setattr(_entrylock, "_NO_OFD_DIRS", {locks})
    return request.param, locks


def lock(locks, digest=DIGEST_A, timeout=5.0):
    return EntryLock(locks, "git", digest, timeout)


def test_a_held_entry_excludes_others_and_frees_on_release(mode):
    name, locks = mode
    holder = lock(locks)
    holder.acquire()
    with pytest.raises(Timeout):
        lock(locks).acquire(timeout=0.05)           # another open file: excluded, even in this process
    other_key = lock(locks, DIGEST_B)
    other_key.acquire(timeout=0)                     # other entries are independent
    other_key.release()
    holder.release()
    again = lock(locks)
    again.acquire(timeout=0)
    again.release()
    files = sorted(os.path.relpath(os.path.join(d, f), locks) for d, _s, fs in os.walk(locks) for f in fs)
    if name == "ofd":
        assert files == [SHARED_LOCK_FILE]          # no file per entry
        assert locks not in _entrylock._NO_OFD_DIRS  # the byte-range lock really worked (no silent fallback)
    else:
        assert files == [f"aa/git-{DIGEST_A}.lock", f"bb/git-{DIGEST_B}.lock"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_forgetting_an_inherited_lock_leaves_it_with_the_parent(mode):
    _name, locks = mode
    holder = lock(locks)
    holder.acquire()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            holder.forget()
            try:
                lock(locks).acquire(timeout=0)
            except Timeout:
                code = 0                               # still the parent's
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with pytest.raises(Timeout):
        lock(locks).acquire(timeout=0)                 # the child's exit released nothing
    holder.release()
    lock(locks).acquire(timeout=0)


def test_a_waiter_gets_the_lock_soon_after_release(mode):
    import threading
    import time

    _name, locks = mode
    holder = lock(locks)
    holder.acquire()
    threading.Timer(0.2, holder.release).start()
    started = time.monotonic()
    waiter = lock(locks)
    waiter.acquire(timeout=5)
    waited = time.monotonic() - started
    waiter.release()
    assert 0.15 <= waited < 0.3                        # polls from 1 ms, doubling to 50 ms at most


_OTHER_PROCESS_TRIES = """
import sys
from streamloader.cache.entrylock import EntryLock, Timeout
try:
    EntryLock(sys.argv[1], "git", sys.argv[2], 5.0).acquire(timeout=0)
except Timeout:
    print("busy")
else:
    print("taken")
"""


def _other_process_gets(locks, digest):
    """Whether a fresh interpreter can take ``digest``'s lock now: "taken" or "busy"."""
    import subprocess

    run = subprocess.run([sys.executable, "-c", _OTHER_PROCESS_TRIES, locks, digest], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


@pytest.mark.skipif(_entrylock._OFD is None, reason="no open-file-description locks on this platform")
def test_a_process_takes_its_locks_through_one_open_file(tmp_path, monkeypatch):
    locks = str(tmp_path / "locks")
    os.makedirs(locks)
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **k: (opened.append(path), real_open(path, *a, **k))[1])
    held = [lock(locks, f"{n:040x}") for n in range(50)]
    for entry in held:
        entry.acquire(timeout=0)
    assert _other_process_gets(locks, f"{7:040x}") == "busy"  # each still excludes other processes
    for entry in held:
        entry.release()
    assert _other_process_gets(locks, f"{7:040x}") == "taken"
    again = lock(locks, f"{7:040x}")
    again.acquire(timeout=0)
    again.release()
    assert opened == [os.path.join(locks, SHARED_LOCK_FILE)]  # one open for 51 locks (none per lock)


@pytest.mark.skipif(_entrylock._OFD is None, reason="no open-file-description locks on this platform")
def test_a_lock_taken_after_the_lock_file_was_deleted_is_in_the_new_file(tmp_path):
    import shutil

    locks = str(tmp_path / "locks")
    os.makedirs(locks)
    first = lock(locks)
    first.acquire(timeout=0)
    shutil.rmtree(locks)  # deleted under a running process (a user cleaning the cache by hand)
    second = lock(locks, DIGEST_B)
    second.acquire(timeout=0)
    assert os.path.exists(os.path.join(locks, SHARED_LOCK_FILE))
    assert _other_process_gets(locks, DIGEST_B) == "busy"  # in the file others open now, not in the deleted one
    second.release()
    first.release()  # (its lock was in the deleted file: released there, without error)
    assert _other_process_gets(locks, DIGEST_B) == "taken"
    second.acquire(timeout=0)
    with pytest.raises(Timeout):
        lock(locks, DIGEST_B).acquire(timeout=0.05)  # a second lock of this process on it waits, as before
    second.release()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_keep_its_parents_locks_after_the_parent_exits(mode):
    import time

    _name, locks = mode
    read_end, write_end = os.pipe()
    holder = os.fork()
    if holder == 0:  # a process that takes a lock, forks a long-lived child, then exits
        code = 1
        try:
            os.close(read_end)
            lock(locks).acquire(timeout=0)
            child = os.fork()
            if child == 0:
                time.sleep(30)
                os._exit(0)
            os.write(write_end, str(child).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    _, status = os.waitpid(holder, 0)
    child = int(os.read(read_end, 32).decode())
    os.close(read_end)
    try:
        assert os.waitstatus_to_exitcode(status) == 0
        assert os.path.exists(f"/proc/{child}") or sys.platform != "linux"  # the child still runs...
        taken = lock(locks)
        taken.acquire(timeout=2)  # ...and the lock ended with its holder
        taken.release()
    finally:
        os.kill(child, 9)


def test_forgetting_a_lock_in_the_process_that_took_it_frees_it(mode):
    _name, locks = mode
    holder = lock(locks)
    holder.acquire(timeout=0)
    holder.forget()  # (what a commit abandoned in its own process does: the lock must not stay held)
    assert _other_process_gets(locks, DIGEST_A) == "taken"
    again = lock(locks)
    again.acquire(timeout=0)
    again.release()
