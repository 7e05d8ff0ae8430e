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
