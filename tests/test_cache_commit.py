"""FileCache.open hands a fresh download to its reader before the entry is fsynced and renamed into place.

The commit runs on a background thread; these tests hold it up (a slow or failing ``os.fsync``) to show that the
reader already has the verified bytes, that the entry's locks stay held until it is in place (no second download),
that a failed commit only loses the cached copy, and that forks and process exits never lose or corrupt one.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from _helpers import git_key
from streamloader.cache import FileCache
from streamloader.cache.commit_queue import QUEUE, CommitQueue, CommitTask

REAL_FSYNC = os.fsync


def counting_fill(data: bytes, calls: list):
    def fill(f):
        calls.append(threading.get_ident())
        f.write(data)
    return fill


@pytest.fixture
def held_fsync(monkeypatch):
    """os.fsync blocks until ``release`` is set (the background commit is held up meanwhile)."""
    release = threading.Event()
    entered = threading.Event()

    def fsync(fd):
        entered.set()
        assert release.wait(30), "test never released fsync"
        return REAL_FSYNC(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    yield entered, release
    release.set()
    QUEUE.drain(30)


def test_reader_gets_the_bytes_before_the_commit_and_the_entry_lands_after(tmp_path, held_fsync):
    entered, release = held_fsync
    cache = FileCache(str(tmp_path / "c"))
    data = os.urandom(40_000)
    calls: list = []
    with cache.open(git_key(data), counting_fill(data, calls), len(data)) as f:
        assert f.read() == data                      # read while the commit is still held up
    assert entered.wait(10)
    assert cache.get(git_key(data)) is None          # not visible until durable
    assert len(os.listdir(os.path.join(cache.root, "tmp"))) == 1
    release.set()
    assert cache.flush(10)
    path = cache.get(git_key(data))
    assert path is not None and open(path, "rb").read() == data
    assert os.listdir(os.path.join(cache.root, "tmp")) == []
    with cache.open(git_key(data), counting_fill(data, calls), len(data)) as f:
        assert f.read() == data
    assert len(calls) == 1


def test_a_second_reader_waits_for_the_pending_commit_instead_of_downloading_again(tmp_path, held_fsync):
    entered, release = held_fsync
    cache = FileCache(str(tmp_path / "c"))
    data = os.urandom(10_000)
    calls: list = []
    cache.open(git_key(data), counting_fill(data, calls), len(data)).close()
    assert entered.wait(10)
    got = []
    other = threading.Thread(target=lambda: got.append(cache.fetch(git_key(data), counting_fill(data, calls),
                                                                   len(data))))
    other.start()
    other.join(0.3)
    assert other.is_alive() and got == []           # blocked behind the entry's lock
    release.set()
    other.join(10)
    assert got and open(got[0], "rb").read() == data
    assert len(calls) == 1


def test_a_failed_commit_keeps_the_reader_right_and_only_loses_the_cached_copy(tmp_path, monkeypatch, caplog):
    def failing_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    cache = FileCache(str(tmp_path / "c"))
    data = os.urandom(5000)
    calls: list = []
    with caplog.at_level(logging.WARNING, logger="streamloader.cache"):
        with cache.open(git_key(data), counting_fill(data, calls), len(data)) as f:
            assert f.read() == data
        assert cache.flush(10)
    assert "could not store cache entry" in caplog.text and "Input/output error" in caplog.text
    assert cache.get(git_key(data)) is None
    assert os.listdir(os.path.join(cache.root, "tmp")) == []
    monkeypatch.setattr(os, "fsync", REAL_FSYNC)
    with cache.open(git_key(data), counting_fill(data, calls), len(data)) as f:   # locks were released
        assert f.read() == data
    cache.flush(10)
    assert cache.get(git_key(data)) is not None and len(calls) == 2


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_waits_for_pending_commits_so_the_child_sees_the_entry(tmp_path, held_fsync):
    entered, release = held_fsync
    cache = FileCache(str(tmp_path / "c"))
    data = os.urandom(8000)
    cache.open(git_key(data), counting_fill(data, []), len(data)).close()
    assert entered.wait(10)
    threading.Timer(0.3, release.set).start()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # child: the entry must already be in place, and the cache usable
        ok = cache.get(git_key(data)) is not None and QUEUE.pending == 0
        os._exit(0 if ok else 1)
    waited = time.monotonic() - started
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert waited >= 0.25


_EXIT_SCRIPT = textwrap.dedent("""
    import hashlib, os, sys, time
    from streamloader.cache import CacheKey, FileCache
    real = os.fsync
    def slow_fsync(fd):
        time.sleep(0.4)
        return real(fd)
    os.fsync = slow_fsync
    data = bytes(range(256)) * 40
    key = CacheKey.from_hash("git", hashlib.sha1(b"blob %d\\x00" % len(data) + data).hexdigest())
    def fill(f):
        f.write(data)
    def work():
        with FileCache(sys.argv[1]).open(key, fill, len(data)) as f:
            assert f.read() == data
    if sys.argv[2] == "main":
        work()          # then the interpreter exits with the commit still pending
    else:
        import multiprocessing as mp
        child = mp.get_context("fork").Process(target=work)   # leaves through os._exit, like a DataLoader worker
        child.start(); child.join()
        sys.exit(child.exitcode)
""")


@pytest.mark.parametrize("where", ["main", "mp-child"])
def test_process_exit_finishes_pending_commits(tmp_path, where):
    root = str(tmp_path / "c")
    proc = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, root, where], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    data = bytes(range(256)) * 40
    path = FileCache(root).get(git_key(data))
    assert path is not None and open(path, "rb").read() == data
    assert os.listdir(os.path.join(root, "tmp")) == []


def test_mp_fork_workers_read_through_pending_commits(tmp_path):
    """Workers forked while the parent's commits run: every file read right, each downloaded once."""
    cache = FileCache(str(tmp_path / "c"))
    blobs = [os.urandom(3000 + i) for i in range(6)]
    counts = tmp_path / "fills"
    counts.mkdir()

    def fill_for(data):
        def fill(f):
            (counts / f"{git_key(data).digest}.{os.getpid()}.{time.monotonic_ns()}").touch()
            f.write(data)
        return fill

    for data in blobs[:3]:
        cache.open(git_key(data), fill_for(data), len(data)).close()
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_read_all, args=(cache, blobs, fill_for)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    per_key = {}
    for name in os.listdir(counts):
        per_key[name.split(".")[0]] = per_key.get(name.split(".")[0], 0) + 1
    assert per_key == {git_key(d).digest: 1 for d in blobs}


def _read_all(cache, blobs, fill_for):
    for data in blobs:
        with cache.open(git_key(data), fill_for(data), len(data)) as f:
            assert f.read() == data


class _Blocking(CommitTask):
    def __init__(self, gate, ran):
        self.gate, self.ran = gate, ran

    def run(self):
        self.gate.wait(10)
        self.ran.append(threading.get_ident())


def test_backlog_is_bounded_extra_work_runs_in_the_caller():
    queue = CommitQueue(max_pending=2)
    gate, ran = threading.Event(), []
    queue.submit(_Blocking(gate, ran))
    queue.submit(_Blocking(gate, ran))
    assert queue.pending == 2
    open_gate = threading.Event()
    open_gate.set()
    queue.submit(_Blocking(open_gate, ran))       # backlog full: runs here, at once, in this thread
    assert ran == [threading.get_ident()]
    gate.set()
    assert queue.drain(10) and queue.pending == 0
    assert len(ran) == 3 and ran.count(threading.get_ident()) == 1


def test_a_failing_task_is_logged_and_the_queue_keeps_going(caplog):
    queue = CommitQueue()

    class Boom(CommitTask):
        def run(self):
            raise RuntimeError("boom")

    done = []

    class Fine(CommitTask):
        def run(self):
            done.append(1)

    with caplog.at_level(logging.WARNING, logger="streamloader.cache.commit_queue"):
        queue.submit(Boom())
        queue.submit(Fine())
        assert queue.drain(10)
    assert done == [1] and "boom" in caplog.text


def _warm_many(cache, n):
    blobs = [os.urandom(5000 + i) for i in range(n)]
    for data in blobs:
        size, cached = cache.warm(git_key(data), counting_fill(data, []), len(data))
        assert (size, cached) == (len(data), False)
    return blobs


def test_commits_waiting_in_a_row_land_together_with_one_sync(tmp_path, held_fsync, monkeypatch):
    from streamloader.cache import writing

    entered, release = held_fsync
    batches = []
    real = writing.sync_files
    monkeypatch.setattr(writing, "sync_files", lambda fds: (batches.append(len(fds)), real(fds))[1])
    cache = FileCache(str(tmp_path / "c"))
    first = _warm_many(cache, 1)
    assert entered.wait(10)  # the commit thread is inside the first entry's fsync
    rest = _warm_many(cache, 20)  # these wait in line meanwhile
    assert all(cache.get(git_key(data)) is None for data in rest)  # nothing visible before it is durable
    release.set()
    assert cache.flush(10)
    assert batches == [20], batches  # one sync for the twenty, not twenty fsyncs
    for data in first + rest:
        with open(cache.get(git_key(data), len(data)), "rb") as f:
            assert f.read() == data
    assert os.listdir(os.path.join(cache.root, "tmp")) == []


def test_when_the_sync_of_a_batch_fails_each_entry_is_fsynced_on_its_own(tmp_path, held_fsync, monkeypatch):
    from streamloader.cache import writing

    entered, release = held_fsync
    synced = []
    monkeypatch.setattr(writing, "sync_files", lambda fds: (_ for _ in ()).throw(OSError(5, "EIO")))
    cache = FileCache(str(tmp_path / "c"))
    first = _warm_many(cache, 1)
    assert entered.wait(10)
    rest = _warm_many(cache, 10)  # a batch of ten waits in line
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or REAL_FSYNC(fd))
    release.set()
    assert cache.flush(10)
    assert len(synced) == 10  # the batch's one sync failed: each entry was fsynced on its own
    for data in first + rest:
        assert cache.get(git_key(data), len(data)) is not None


def test_drain_gives_up_in_time_even_while_another_holds_the_queue_lock():
    """A worker's SIGTERM handler drains from the main thread, which may hold the queue's lock at that instant
    (interrupted inside submit()): the wait must stay bounded, taking the lock included."""
    queue = CommitQueue()
    queue._cond.acquire()
    try:
        started = time.monotonic()
        outcome: list = []
        waiter = threading.Thread(target=lambda: outcome.append(queue.drain(0.3)), daemon=True)
        waiter.start()
        waiter.join(5)
        assert outcome == [False] and 0.25 <= time.monotonic() - started < 3
    finally:
        queue._cond.release()
    assert queue.drain(0.3) is True  # free again: nothing pending


def _claim_into(cache, batch, n):
    blobs = [os.urandom(3000 + i) for i in range(n)]
    for data in blobs:
        state, claim = cache.try_claim(git_key(data), len(data))
        assert state == "claimed"
        assert claim.store(counting_fill(data, []), batch) == len(data)
    return blobs


def test_a_commit_batch_lands_its_entries_with_one_sync_when_its_owner_runs_it(tmp_path, monkeypatch):
    from streamloader.cache import writing

    syncs = []
    real = writing.sync_files
    monkeypatch.setattr(writing, "sync_files", lambda fds: (syncs.append(len(fds)), real(fds))[1])
    queued = []
    monkeypatch.setattr(QUEUE, "submit", queued.append)
    cache = FileCache(str(tmp_path / "c"))
    batch = writing.CommitBatch(max_len=100, max_age=0.05)
    assert not batch.due()
    blobs = _claim_into(cache, batch, 12)
    assert len(batch) == 12 and queued == []  # held by the batch, not the background queue
    for data in blobs:
        assert cache.get(git_key(data)) is None  # not visible before it is durable
        assert cache.try_claim(git_key(data), len(data)) == ("busy", None)  # its locks are still held
    time.sleep(0.06)
    assert batch.due()
    batch.run()
    assert syncs == [12] and len(batch) == 0 and not batch.due()
    for data in blobs:
        with open(cache.get(git_key(data), len(data)), "rb") as f:
            assert f.read() == data
        assert cache.try_claim(git_key(data), len(data)) == ("cached", None)
    assert os.listdir(os.path.join(cache.root, "tmp")) == []
    batch.run()  # nothing left: nothing happens
    assert syncs == [12]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
@pytest.mark.parametrize("taken", [False, True], ids=["waiting", "taken-for-sync"])
def test_a_forked_child_drops_the_commits_of_a_batch_and_the_parent_still_lands_them(tmp_path, taken):
    from streamloader.cache.writing import CommitBatch

    cache = FileCache(str(tmp_path / "c"))
    batch = CommitBatch()
    blobs = _claim_into(cache, batch, 3)
    files = {commit.raw.fileno(): os.fstat(commit.raw.fileno()).st_ino for commit in batch._commits}
    commits = batch.take() if taken else None  # (handed to a sync that is under way when the fork comes)
    pid = os.fork()
    if pid == 0:  # the child: nothing inherited is left open, nothing was committed here
        code = 0
        try:
            if len(batch) != 0:
                code = 3
            for fd, inode in files.items():
                try:
                    if os.fstat(fd).st_ino == inode:  # (the number may be reused by then: the file may not)
                        code = 4
                except OSError:
                    pass
            if any(cache.get(git_key(data)) is not None for data in blobs):
                code = 5
        finally:
            os._exit(code)
    _pid, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    if taken:
        batch.finish(commits, CommitBatch.sync(commits))
        assert batch._taken == []
    else:
        assert len(batch) == 3
        batch.run()
    for data in blobs:
        with open(cache.get(git_key(data), len(data)), "rb") as f:
            assert f.read() == data
