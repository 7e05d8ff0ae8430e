"""Finish small pieces of work off the caller's path: one daemon thread per process, tasks run in order.

The cache uses it to make a freshly downloaded entry durable (``fsync``) and visible (rename) while the reader
already reads it, so a one-file-at-a-time loop does not wait ~1 ms per file for the disk. Rules that keep that safe:

- the backlog is bounded: when ``max_pending`` tasks are waiting, ``submit`` runs the task in the caller instead;
- a process never forks with work pending: a fork handler waits for the queue to drain and holds it empty across
  the fork (a child would otherwise inherit half-finished tasks and the lock fds they hold);
- the queue drains at interpreter exit and when a ``multiprocessing`` child (e.g. a DataLoader worker) finishes;
- a task that fails is logged, never raised into an unrelated caller (tasks own their cleanup).
"""
from __future__ import annotations

import atexit
import collections
import logging
import os
import threading
import time
from typing import Deque, List, Optional

from streamloader import _forksafe

log = logging.getLogger(__name__)

__all__ = ["CommitTask", "CommitQueue", "QUEUE"]

_FORK_DRAIN_TIMEOUT = 60.0  # a fork waits this long for pending tasks (a hung disk must not hang the fork forever)
_EXIT_DRAIN_TIMEOUT = 60.0  # and so does a process exit
_GATHER = 0.003  # seconds a batchable task waits for others to join its batch


class CommitTask:
    """One unit of work. ``run`` does it; ``abandon`` drops it in a forked child that inherited it undone.

    Tasks of a class that defines ``run_batch(tasks)`` (a classmethod) are handed over together when several of
    them wait in a row (at most ``batch_max``): the cache makes a whole batch of new entries durable with one
    journal commit instead of one ``fsync`` each."""

    batch_max = 1

    def run(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def run_batch(cls, tasks: List["CommitTask"]) -> None:
        """Run ``tasks`` (all of this class); the default runs them one by one."""
        for task in tasks:
            _run_logged(task)

    def abandon(self) -> None:
        """Called in a forked child for a task the parent still owns: release inherited resources, do nothing else."""


class CommitQueue:
    """A bounded FIFO of :class:`CommitTask` run by one lazily started daemon thread (see the module docstring)."""

    def __init__(self, max_pending: int = 128):
        self.max_pending = max_pending
        self._reset()

    def _reset(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._tasks: Deque[CommitTask] = collections.deque()
        self._unfinished = 0  # queued + running
        self._running: List[CommitTask] = []
        self._thread: Optional[threading.Thread] = None
        self._exit_hooks_pid: Optional[int] = None

    def submit(self, task: CommitTask) -> None:
        """Queue ``task``; when the backlog is full (or no thread can be started) run it here and now."""
        with self._cond:
            if self._unfinished < self.max_pending and self._ensure_thread():
                self._tasks.append(task)
                self._unfinished += 1
                self._cond.notify_all()
                return
        _run_logged(task)

    def drain(self, timeout: Optional[float] = None) -> bool:
        """Wait until every submitted task has finished; False if ``timeout`` seconds passed first (or when a task
        itself asks: it cannot wait for itself)."""
        if threading.current_thread() is self._thread:
            return False
        deadline = None if timeout is None else time.monotonic() + timeout
        # bounded even to take the lock: a signal handler may drain while its own thread holds it (submit())
        if not self._cond.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            return False
        try:
            return self._cond.wait_for(lambda: self._unfinished == 0,
                                       None if deadline is None else max(0.0, deadline - time.monotonic()))
        finally:
            self._cond.release()

    @property
    def pending(self) -> int:
        """Tasks queued or running right now."""
        return self._unfinished

    # -- the thread -----------------------------------------------------------------------------------------------
    def _ensure_thread(self) -> bool:
        # called with self._cond held
        if self._thread is not None:
            return True
        thread = threading.Thread(target=self._loop, name="streamloader-cache-commit", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # interpreter shutting down: callers run tasks themselves
            return False
        self._thread = thread
        if self._exit_hooks_pid != os.getpid():
            self._exit_hooks_pid = os.getpid()
            atexit.register(self._drain_at_exit)
            try:  # multiprocessing children (DataLoader workers) leave through os._exit: atexit never runs there
                from multiprocessing import util

                util.Finalize(None, self._drain_at_exit, exitpriority=100)
            except Exception:  # pragma: no cover - multiprocessing unavailable
                pass
        return True

    def _drain_at_exit(self) -> None:
        if not self.drain(_EXIT_DRAIN_TIMEOUT):
            log.warning("exiting with %d background cache commits unfinished after %.0fs; those entries are not "
                        "cached (their temp files are swept later)", self._unfinished, _EXIT_DRAIN_TIMEOUT)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._tasks:
                    self._cond.wait()
                task = self._tasks.popleft()
                batch = [task]
                kind = type(task)
                if kind.batch_max > 1:
                    # a moment for more to arrive (a prefetch lands files every few hundred microseconds): one
                    # batch then costs the disk a few flushes where each alone would cost one
                    deadline = time.monotonic() + _GATHER
                    while len(self._tasks) < kind.batch_max - 1:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        self._cond.wait(remaining)
                while self._tasks and len(batch) < kind.batch_max and type(self._tasks[0]) is kind:
                    batch.append(self._tasks.popleft())
                self._running = batch
            try:
                if len(batch) == 1:
                    _run_logged(task)
                else:
                    try:
                        kind.run_batch(batch)
                    except Exception:
                        log.warning("background batch of %d tasks %r failed", len(batch), task, exc_info=True)
            finally:
                with self._cond:
                    self._running = []
                    self._unfinished -= len(batch)
                    self._cond.notify_all()
            del task, batch  # (done: nothing of theirs is kept while the thread waits for more)

    # -- fork -----------------------------------------------------------------------------------------------------
    def _before_fork(self) -> None:
        self._cond.acquire()
        if not self._cond.wait_for(lambda: self._unfinished == 0, _FORK_DRAIN_TIMEOUT):
            log.warning("forking with %d background cache commits still running (waited %.0fs); the child drops "
                        "them, the parent finishes them", self._unfinished, _FORK_DRAIN_TIMEOUT)

    def _after_fork_in_parent(self) -> None:
        self._cond.release()

    def _after_fork_in_child(self) -> None:
        inherited = list(self._running) + list(self._tasks)
        self._reset()
        for task in inherited:
            try:
                task.abandon()
            except Exception:  # pragma: no cover - best effort in a fresh child
                log.debug("abandoning an inherited task failed", exc_info=True)


def _run_logged(task: CommitTask) -> None:
    """Run ``task``; a failure is logged, not raised (tasks own their cleanup)."""
    try:
        task.run()
    except Exception:
        log.warning("background task %r failed", task, exc_info=True)


QUEUE = CommitQueue()
_forksafe.register(before=QUEUE._before_fork, after_in_parent=QUEUE._after_fork_in_parent,
                   after_in_child=QUEUE._after_fork_in_child)
