"""One way for a module to keep its process-wide state usable across ``fork()``: :func:`register`.

Locks held by another thread at fork time are never released in the child, and a child inherits the parent's open
lock files and background work; the modules that keep such state register handlers that renew or quiesce it
around a fork. ``os.register_at_fork`` does not exist where there is no ``fork()`` (Windows): there is nothing to
make safe there, so :func:`register` does nothing, and importing the library works on every platform.
"""
from __future__ import annotations

import os
import threading
from typing import Callable, Dict, Optional

__all__ = ["ForkGate", "NO_FORK", "register"]

Handler = Optional[Callable[[], None]]


def register(before: Handler = None, after_in_parent: Handler = None, after_in_child: Handler = None) -> bool:
    """Have ``before`` run just before every ``fork()``, ``after_in_parent`` / ``after_in_child`` just after it in
    the parent / the child (as :func:`os.register_at_fork`; handlers left None are not registered).

    Returns True when the handlers were registered, False where the platform has no ``fork()`` (nothing to do).
    """
    hooks: Dict[str, Callable[[], None]] = {name: handler for name, handler in
                                            (("before", before), ("after_in_parent", after_in_parent),
                                             ("after_in_child", after_in_child)) if handler is not None}
    if not hooks:
        raise TypeError("register() needs at least one handler")
    register_at_fork = getattr(os, "register_at_fork", None)
    if register_at_fork is None:
        return False
    register_at_fork(**hooks)
    return True


class ForkGate:
    """``with NO_FORK:`` marks a call into C code that takes process-wide locks with the GIL released (SQLite: its
    global memory and open mutexes); a ``fork()`` waits until no such call is running, and none starts until the
    fork is done. A lock held by another thread at fork time is never released in the child, so a child forked in
    the middle of one (a DataLoader worker started while a background prefetch queries the listing store) would
    hang at its own first call. The wait before a fork is bounded (``wait`` seconds, then the fork goes ahead, as it
    would without the gate). Sections must not nest (a nested one would wait out that bound at a fork).
    """

    def __init__(self, wait: float = 5.0) -> None:
        self.wait = wait
        self._reset()
        register(before=self._before_fork, after_in_parent=self._after_fork_in_parent,
                 after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._inside = 0
        self._forking = False

    def __enter__(self) -> None:
        with self._lock:
            while self._forking:
                self._changed.wait()
            self._inside += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._inside -= 1
            if self._forking and not self._inside:
                self._changed.notify_all()

    @property
    def inside(self) -> int:
        """Sections running right now (for tests and debugging)."""
        return self._inside

    def _before_fork(self) -> None:
        self._lock.acquire()  # held across the fork: no section starts meanwhile
        self._forking = True
        self._changed.wait_for(lambda: not self._inside, self.wait)

    def _after_fork_in_parent(self) -> None:
        self._forking = False
        self._changed.notify_all()
        self._lock.release()


#: the process's gate (see :class:`ForkGate`)
NO_FORK = ForkGate()
